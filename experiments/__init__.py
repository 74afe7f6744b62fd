"""Experiments that drive pretraining and the evaluations through their public functions:
`fcmae sweep` (one pretraining setting swept, each encoder scored), `fcmae visualize`
(reconstruction pictures of a checkpoint) and `fcmae plot` (training curves). Each writes its
tables and PNGs into a folder of its own. Imports the core and the fine-tuning stage, never the
other way round."""
