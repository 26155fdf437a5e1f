"""Why this answer: class-activation heat-maps (cam) and the gallery photos a prediction rests on (evidence).

Layer: beside engine/retrieval; imports models/data/config/utils and retrieval, never serve/report/cli.
"""
