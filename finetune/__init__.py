"""The fine-tuning stage: layer-wise lr decay, EMA, evaluation, linear probe, kNN.
Imports the fcmae core, never the other way round."""
