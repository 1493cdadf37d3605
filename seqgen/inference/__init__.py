"""Using a trained model, one module per task: translation.py, captioning.py, lm.py.

These functions take a loaded `Seq2Seq` and know nothing of training, so `Seq2Seq.translate` / `.caption` can
call them without model.py depending on the trainer or the tasks (seqgen/tasks/ holds each task's training
wiring, and imports from here).
"""


def default_decoding(job: str):
    """The GenerationConfig a decoding job uses when no option is given (the CLI's --help shows it; the server
    uses it too): translate and evaluate search with beam 5; caption also stops at 30 tokens and never repeats
    a word trigram (`captioning.default_caption_gen`); generate samples at temperature 0.8."""
    from seqgen.generation import GenerationConfig
    from seqgen.inference.captioning import default_caption_gen
    if job == "caption":
        return default_caption_gen()
    if job == "generate":
        return GenerationConfig(temperature=0.8)
    return GenerationConfig(beam=5)
