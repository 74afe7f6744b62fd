"""The FCMAE pretraining job and its reconstruction pictures."""
