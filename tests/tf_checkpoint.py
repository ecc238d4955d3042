"""Writes a GPT-2 as OpenAI's release does: a TF1 checkpoint with OpenAI's variable names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def openai_variables(hf_model) -> dict[str, np.ndarray]:
    """OpenAI's variable names and shapes, from a ``transformers`` GPT-2 (Conv1D weights are (in, out))."""
    sd = {k.removeprefix("transformer."): v.detach().numpy() for k, v in hf_model.state_dict().items()}
    cfg = hf_model.config
    out = {
        "model/wte": sd["wte.weight"],
        "model/wpe": sd["wpe.weight"],
        "model/ln_f/g": sd["ln_f.weight"],
        "model/ln_f/b": sd["ln_f.bias"],
    }
    for i in range(cfg.n_layer):
        for ln in ("ln_1", "ln_2"):
            out[f"model/h{i}/{ln}/g"] = sd[f"h.{i}.{ln}.weight"]
            out[f"model/h{i}/{ln}/b"] = sd[f"h.{i}.{ln}.bias"]
        for proj in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            name = proj.replace("/", ".")
            out[f"model/h{i}/{proj}/w"] = sd[f"h.{i}.{name}.weight"][None]  # (1, in, out)
            out[f"model/h{i}/{proj}/b"] = sd[f"h.{i}.{name}.bias"]
    return out


def write_openai_checkpoint(hf_model, directory: Path) -> None:
    import tensorflow as tf

    directory = Path(directory)
    cfg = hf_model.config
    hparams = {
        "n_vocab": cfg.vocab_size,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "n_layer": cfg.n_layer,
    }
    (directory / "hparams.json").write_text(json.dumps(hparams))
    graph = tf.Graph()
    with graph.as_default():
        variables = [tf.compat.v1.Variable(value, name=name) for name, value in openai_variables(hf_model).items()]
        saver = tf.compat.v1.train.Saver(variables)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(directory / "model.ckpt"))
