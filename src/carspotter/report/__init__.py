"""carspotter.report"""
