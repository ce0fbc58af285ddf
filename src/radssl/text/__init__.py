"""Reports as model input: tokenizers (fitted on a run's own reports, or a local Hugging Face model's) and text
encoders. A leaf package like ``radssl.models``: view policies tokenise with it, image–text methods embed with it."""
