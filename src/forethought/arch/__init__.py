"""Architectures lab: standard, Feedback Transformer, myopic and recurrent LMs trained and compared on one loop."""
