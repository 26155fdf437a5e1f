"""carspotter.retrieval"""
