"""seqgen: sequence generation from any input with one RNN decoder and shared search.

    from seqgen import load_model
    model = load_model("runs/de-en/best.pt")
    model.translate(["Ein Hund läuft im Schnee."], beam=5)
"""
from seqgen.errors import SeqgenError

__all__ = ["SeqgenError", "load_model", "Seq2Seq", "ModelConfig", "GenerationConfig"]


def __getattr__(name: str):
    # Lazy: `import seqgen` stays cheap (the CLI imports torch only for commands that need it).
    if name in ("load_model", "Seq2Seq", "ModelConfig"):
        from seqgen import model
        return getattr(model, name)
    if name == "GenerationConfig":
        from seqgen.generation import GenerationConfig
        return GenerationConfig
    raise AttributeError(f"module 'seqgen' has no attribute {name!r}")
