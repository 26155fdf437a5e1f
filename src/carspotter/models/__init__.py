"""carspotter.models"""
