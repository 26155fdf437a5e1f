"""carspotter.engine"""
