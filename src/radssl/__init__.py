"""radssl: self-supervised pretraining and label-efficiency studies for radiological images."""

__version__ = "0.1.0"
