"""carspotter.serve"""
