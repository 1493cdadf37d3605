"""Seq2Seq = encoder (text RNN | image CNN | none) + the shared RNNDecoder + tokenizers.

This is the one place where a config becomes modules, and where a checkpoint becomes a model. `Ensemble`
is several trained models of one task decoded as one (decoders/ensemble.py averages their probabilities);
`load_model("a.pt,b.pt")` or `load_model(["a.pt", "b.pt"])` returns one.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from seqgen.checkpoint import load_checkpoint, payload_json
from seqgen.config import from_dict, to_dict, validate
from seqgen.data.batch import Batch
from seqgen.decoders import search
from seqgen.decoders.ensemble import EnsembleDecoder, EnsembleEncoding
from seqgen.decoders.fast_step import SMALL_BATCH
from seqgen.decoders.output_loss import linear_cross_entropy
from seqgen.decoders.rnn import DecoderConfig, RNNDecoder
from seqgen.decoders.search import Hypothesis
from seqgen.encoders.base import EncoderOutput
from seqgen.encoders.cnn import CNNEncoderConfig, CNNImageEncoder
from seqgen.encoders.rnn import RNNEncoderConfig, RNNTextEncoder
from seqgen.errors import SeqgenError, cut_repr
from seqgen.generation import GenerationConfig
from seqgen.inference import captioning, translation
from seqgen.precision import autocast, autocast_dtype
from seqgen.tokenizers import TextCodec

Task = Literal["lm", "translation", "captioning"]

# The largest model seqgen builds (4 GiB of float32 weights): a config asking for more is a typo or a crafted
# checkpoint (hidden = 2**20 would be a 17.6 TB allocation), refused before anything is allocated.
MAX_PARAMETERS = 1 << 30


@dataclass
class ModelConfig:
    """What a model is, as every checkpoint stores it.

    task:          lm, translation or captioning
    decoder:       the shared decoder
    text_encoder:  translation: the text encoder (None otherwise)
    image_encoder: captioning: the image encoder (None otherwise)
    """

    task: Task = "lm"
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    text_encoder: RNNEncoderConfig | None = None
    image_encoder: CNNEncoderConfig | None = None


def check_size(build: Callable[[], nn.Module], what: str) -> None:
    """Refuse a module that `build()` would make with more than MAX_PARAMETERS parameters (counted on the meta
    device: nothing is allocated)."""
    with torch.device("meta"):
        n = sum(p.numel() for p in build().parameters())
    if n > MAX_PARAMETERS:
        raise SeqgenError(f"the {what} would have {n:,} parameters ({n * 4 / 2**30:,.1f} GiB), more than the "
                          f"{MAX_PARAMETERS:,} seqgen builds; check its sizes (emb, hidden, layers, vocabulary)")


def build_encoder(cfg: ModelConfig, src: TextCodec | None) -> nn.Module | None:
    """The encoder module for `cfg.task` (None for a language model)."""
    if cfg.task == "lm":
        return None
    if cfg.task == "translation":
        if cfg.text_encoder is None or src is None:
            raise SeqgenError("a translation model needs a text encoder config and a source vocabulary")
        check_size(lambda: RNNTextEncoder(cfg.text_encoder, len(src.vocab), pad_id=src.vocab.pad), "text encoder")
        return RNNTextEncoder(cfg.text_encoder, len(src.vocab), pad_id=src.vocab.pad)
    if cfg.image_encoder is None:
        raise SeqgenError("a captioning model needs an image encoder config")
    return CNNImageEncoder(cfg.image_encoder)


class Seq2Seq(nn.Module):
    """encoder + decoder + codecs. `tgt` turns generated ids into text; `src` encodes source text."""

    def __init__(self, config: ModelConfig, tgt: TextCodec, src: TextCodec | None = None):
        super().__init__()
        self.config, self.tgt, self.src = validate(config), tgt, src
        self.encoder = build_encoder(config, src)

        def decoder() -> RNNDecoder:
            return RNNDecoder(config.decoder, len(tgt.vocab), pad_id=tgt.vocab.pad,
                              enc_state_size=getattr(self.encoder, "state_size", None),
                              memory_size=getattr(self.encoder, "memory_size", None))

        check_size(decoder, "decoder")
        self.decoder = decoder()

    @property
    def device(self) -> torch.device:
        return self.decoder.embed.weight.device

    # -- training ------------------------------------------------------------------------------------
    def encode(self, source: Tensor | EncoderOutput | None, lengths: Tensor | None = None) -> EncoderOutput | None:
        """Run the encoder; precomputed features (an EncoderOutput) and a missing encoder pass through."""
        if source is None or isinstance(source, EncoderOutput) or self.encoder is None:
            return source if isinstance(source, EncoderOutput) else None
        return self.encoder(source, lengths) if lengths is not None else self.encoder(source)

    def forward(self, batch: Batch, *, output_layer: bool = True) -> Tensor:
        """Teacher-forced logits [B, T, V] for predicting batch.target[:, 1:] (without `output_layer`: the
        output layer's input [B, T, O], see RNNDecoder.features)."""
        enc = self.encode(batch.source, batch.source_lengths)
        tokens = batch.target[:, :-1]
        out, _ = self.decoder(tokens, self.decoder.init_state(enc, tokens.size(0)), enc, output_layer=output_layer)
        return out

    def loss(self, batch: Batch, label_smoothing: float = 0.0) -> tuple[Tensor, int]:
        """Mean cross-entropy per target token (nats) and the number of tokens it averages over.

        The output layer and the loss are fused (seqgen.decoders.output_loss): the [B, T, V] logits of
        `forward` are never held whole. Call `backward()` on the loss at most once.
        """
        features = self(batch, output_layer=False)
        out = self.decoder.output
        return linear_cross_entropy(features, out.weight, out.bias, batch.target[:, 1:],
                                    ignore_index=self.tgt.vocab.pad, label_smoothing=label_smoothing)

    # -- inference -----------------------------------------------------------------------------------
    def generate(self, source: Tensor | EncoderOutput | None = None, lengths: Tensor | None = None, *,
                 batch_size: int | None = None, gen: GenerationConfig | None = None,
                 prefix: Tensor | None = None, generator: torch.Generator | None = None,
                 stream: search.StreamFn | None = None) -> list[list[Hypothesis]]:
        """Decode a batch. Returns, per input, `gen.n_best` hypotheses (one for greedy/sampling), best first.

        source: [B, S] ids / [B, 3, H, W] images / EncoderOutput / None (then `batch_size` inputs).
        prefix: [P] or [B, P] forced tokens after bos (a prompt).
        stream: stream(i, token ids) as input i's output settles (seqgen.decoders.search).
        """
        gen = gen or GenerationConfig()
        gen.validate()
        amp = gen.amp
        if amp == "auto" and self.device.type == "cpu" and _num_inputs(source, batch_size) * gen.beam <= SMALL_BATCH:
            amp = "off"   # memory-bound steps: bf16 saves no time and autocast adds a cast per op
        # inference_mode is cheaper per op than no_grad (decoding is many small ops), but autocast caches its
        # low-precision copies of the weights only outside it: under inference_mode every step re-cast every weight.
        no_grad = torch.no_grad() if autocast_dtype(amp, self.device) is not None else torch.inference_mode()
        # Only a model in training mode is switched: train()/eval() walk every module, which for a CNN encoder
        # costs more per batch of a folder run than the writing does.
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with no_grad, autocast(amp, self.device):
                return self._generate(source, lengths, batch_size, gen, prefix, generator, stream)
        finally:
            if was_training:
                self.train()

    def _generate(self, source: Tensor | EncoderOutput | None, lengths: Tensor | None, batch_size: int | None,
                  gen: GenerationConfig, prefix: Tensor | None, generator: torch.Generator | None,
                  stream: search.StreamFn | None = None) -> list[list[Hypothesis]]:
        """`generate` inside its autocast region (same arguments)."""
        enc = self.decoder.prepare(self.encode(source, lengths), decoding=True)
        n = batch_size if enc is None else _batch_of(enc)
        if n is None:
            raise ValueError("generate() needs a source or batch_size")
        state = self.decoder.init_state(enc, n)
        common = dict(bos=self.tgt.vocab.bos, eos=self.tgt.vocab.eos, max_len=gen.max_len,
                      min_len=gen.min_len, prefix=prefix, no_repeat_ngram=gen.no_repeat_ngram, stream=stream)
        if gen.beam > 1:
            return search.beam_search(self.decoder, state, enc, beam=gen.beam, n_best=gen.n_best,
                                      length_penalty=gen.length_penalty, **common)
        if gen.temperature > 0:
            hyps = search.sample(self.decoder, state, enc, temperature=gen.temperature, top_k=gen.top_k,
                                 top_p=gen.top_p, generator=generator, **common)
        else:
            hyps = search.greedy(self.decoder, state, enc, **common)
        return [[h] for h in hyps]

    # -- task APIs (thin: the work is in seqgen.inference, which never imports this module) -------------
    def translate(self, sentences: list[str], *, beam: int = 5, batch_size: int = 64, **gen_options) -> list[str]:
        """Translate source sentences; returns detokenized target sentences (see seqgen.inference.translation)."""
        return translation.translate(self, sentences, GenerationConfig(beam=beam, **gen_options),
                                     batch_size=batch_size)

    def caption(self, images: list, *, beam: int = 5, batch_size: int = 64, **gen_options) -> list[str]:
        """Caption image paths or PIL images; returns one caption per image (see seqgen.inference.captioning)."""
        return captioning.caption_images(self, images, captioning.default_caption_gen(beam=beam, **gen_options),
                                         batch_size=batch_size)

    # -- checkpoints -----------------------------------------------------------------------------------
    def to_payload(self) -> dict:
        """Plain data describing this model completely (config, codecs, weights)."""
        return {"task": self.config.task, "config": json.dumps(to_dict(self.config)),
                "tgt": self.tgt.to_dict(), "src": self.src.to_dict() if self.src is not None else None,
                "model": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_payload(cls, payload: dict, *, where: str = "checkpoint") -> "Seq2Seq":
        """The model a payload describes; a compact payload (seqgen.zoo.compact) is expanded to float32."""
        from seqgen.zoo.compact import expand_payload, external_weights, is_compact
        check_weights(payload.get("model"), where, finite=False)
        external_source, external_keys = None, []
        if is_compact(payload):
            external_source, external_keys = external_weights(payload)
            payload = expand_payload(payload, where)
        check_weights(payload["model"], where)
        config = from_dict(ModelConfig, payload_json(payload, "config", where), where=where)
        try:
            tgt = TextCodec.from_dict(payload["tgt"])
            src = TextCodec.from_dict(payload["src"]) if payload.get("src") is not None else None
        except (KeyError, TypeError, ValueError) as e:
            raise SeqgenError(f"{where}: checkpoint is missing or has a malformed entry ({cut_repr(str(e))})") from None
        if config.image_encoder is not None:
            # the trained weights are in the checkpoint: never fetch or read backbone weights again
            # (a compact file names the package that installs its frozen backbone's weights instead)
            config.image_encoder = dataclasses.replace(config.image_encoder, weights=external_source,
                                                       weights_file=None)
        elif external_keys:
            raise SeqgenError(f"{where}: compact file leaves weights to a package, but the model has no image encoder")
        try:
            model = cls(config, tgt, src)
        except (SeqgenError, ValueError) as e:
            raise SeqgenError(f"{where}: {e}") from None
        try:
            missing, unexpected = model.load_state_dict(payload["model"], strict=not external_keys)
        except RuntimeError as e:
            raise SeqgenError(f"{where}: weights do not match the model config "
                              f"({str(e).splitlines()[0][:160]})") from None
        # (BatchNorm does not report a missing num_batches_tracked: missing may be a strict subset)
        if external_keys and (unexpected or not set(missing) <= set(external_keys)):
            raise SeqgenError(f"{where}: weights do not match the model config ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(external_keys)} left to {external_source})")
        return model


def check_weights(weights: object, where: str, *, finite: bool = True) -> None:
    """A checkpoint's weights must be a mapping of names to tensors, and (`finite`) hold no NaN or inf: else one
    line naming the first bad one."""
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                for k, v in weights.items()):
        raise SeqgenError(f"{where}: the checkpoint's weights are not a mapping of names to tensors (not written "
                          f"by seqgen, or modified)")
    for name, w in weights.items() if finite else ():
        if w.is_floating_point() and not bool(torch.isfinite(w).all()):
            raise SeqgenError(f"{where}: weight {cut_repr(name)} holds non-finite values (NaN or inf); the model "
                              f"cannot be used (was it saved after training diverged?)")


def _num_inputs(source: Tensor | EncoderOutput | None, batch_size: int | None) -> int:
    """How many sequences `generate` decodes (before beams)."""
    if isinstance(source, EncoderOutput):
        return _batch_of(source)
    return source.size(0) if isinstance(source, Tensor) else (batch_size or 1)


def _batch_of(enc: EncoderOutput) -> int:
    for t in (enc.state, enc.memory):
        if t is not None:
            return t.size(0)
    raise ValueError("EncoderOutput has no tensors")


# What each task's models are used with: named in the error when a model is given the wrong job.
TASK_COMMANDS = {"translation": "a translation model: use it with `seqgen translate` or `seqgen evaluate`",
                 "captioning": "an image captioning model: use it with `seqgen caption` or `seqgen evaluate`",
                 "lm": "a language model: use it with `seqgen generate`"}


def model_list(spec: str | Sequence[str]) -> list[str]:
    """The models `spec` names: a list as is; "a.pt,b.pt" split at commas unless it is an existing path."""
    if not isinstance(spec, str):
        return list(spec)
    if "," in spec and not os.path.exists(spec):
        parts = [p.strip() for p in spec.split(",")]
        if not all(parts):
            raise SeqgenError(f"{spec!r}: an empty model name between commas")
        return parts
    return [spec]


def load_model(path: str | Sequence[str], *, device: str | torch.device = "cpu",
               task: Task | None = None) -> Seq2Seq:
    """Load a trained model, in eval mode on `device`, from a checkpoint file or by the name of a model that
    ships with seqgen (`seqgen models` lists them; a path that exists wins over a name).

    Several models ("a.pt,b.pt" or a list) of one task and target vocabulary load as one `Ensemble`.
    task: if given, a model of another task is refused with one line saying what the model is for.
    """
    paths = model_list(path)
    if len(paths) > 1:
        return Ensemble([load_model(p, device=device, task=task) for p in paths], names=paths)
    path = paths[0]
    from seqgen.zoo import resolve
    name, path = path, resolve(path)
    payload = load_checkpoint(path)
    found = payload.get("task")
    if task is not None and found != task:
        what = TASK_COMMANDS.get(found, f"a {found!r} model")
        raise SeqgenError(f"{name} is {what}; this needs {TASK_COMMANDS[task].split(':')[0]}")
    return Seq2Seq.from_payload(payload, where=path).to(device).eval()


# -- ensembles: several models of one task decoded as one ----------------------------------------------

class _EnsembleEncoder(nn.Module):
    def __init__(self, members: Sequence[Seq2Seq]):
        super().__init__()
        self.members = list(members)       # registered by the Ensemble's ModuleList, not twice here

    def forward(self, source: Tensor, lengths: Tensor | None = None) -> EnsembleEncoding:
        return EnsembleEncoding([m.encode(source, lengths) for m in self.members])


def check_compatible(members: Sequence[Seq2Seq], names: Sequence[str]) -> None:
    """SeqgenError naming the first member that cannot join the first one, and why."""
    first, name0 = members[0], names[0]
    for m, name in zip(members[1:], names[1:]):
        if m.config.task != first.config.task:
            raise SeqgenError(f"cannot ensemble {name0} ({first.config.task}) with {name} ({m.config.task}): "
                              f"the models must do the same task")
        if m.tgt != first.tgt:
            raise SeqgenError(f"cannot ensemble {name0} with {name}: their target vocabularies differ "
                              f"({len(first.tgt.vocab)} vs {len(m.tgt.vocab)} tokens); members must share it")
        if first.config.task == "translation" and m.src != first.src:
            raise SeqgenError(f"cannot ensemble {name0} with {name}: their source vocabularies differ")
        if first.config.task == "captioning":
            a, b = first.config.image_encoder.image_size, m.config.image_encoder.image_size
            if a != b:
                raise SeqgenError(f"cannot ensemble {name0} with {name}: image sizes differ ({a} vs {b})")


class Ensemble(Seq2Seq):
    """Several Seq2Seq models of one task as one (see the module docstring)."""

    def __init__(self, members: Sequence[Seq2Seq], names: Sequence[str] | None = None):
        nn.Module.__init__(self)
        if not members:
            raise SeqgenError("an ensemble needs at least one model")
        names = list(names or [f"model {i + 1}" for i in range(len(members))])
        check_compatible(members, names)
        first = members[0]
        self.config, self.tgt, self.src = first.config, first.tgt, first.src
        self.members = nn.ModuleList(members)
        self.encoder = _EnsembleEncoder(members) if first.encoder is not None else None
        self.decoder = EnsembleDecoder([m.decoder for m in members])

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def forward(self, batch):
        raise SeqgenError("an ensemble decodes; train its members one by one")

    def to_payload(self) -> dict:
        raise SeqgenError("an ensemble is not saved as one checkpoint: average compatible checkpoints with "
                          "`seqgen average`, or pass the members again")
