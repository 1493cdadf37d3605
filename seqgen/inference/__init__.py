"""Using a trained model, one module per task: translation.py, captioning.py, lm.py.

These functions take a loaded `Seq2Seq` and know nothing of training, so `Seq2Seq.translate` / `.caption` can
call them without model.py depending on the trainer or the tasks (seqgen/tasks/ holds each task's training
wiring, and imports from here).
"""
