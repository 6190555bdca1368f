"""Using a trained model: load it, answer questions, evaluate it on any file (sampling, pass@k), export it.

``load(path)`` takes a run folder, a checkpoint folder or an exported folder and needs no training code
or config file::

    from noblankslate.inference import load
    model = load("runs/demo/coconut")
    for a in model.answer(["Is Tom a wumpus or a yumpus?"], top_tokens=3):
        print(a.answer, a.thoughts, a.thought_tokens)

Layer: above eval (it reuses the evaluation's prompts, generation and records), beside memory, below
train; the command line (``nbs generate``, ``nbs eval``, ``nbs export``) is in ``noblankslate.cli.inference``.
"""

from noblankslate.inference.loading import load
from noblankslate.inference.model import Answer, InferenceError, ThinkingModel

__all__ = ["Answer", "InferenceError", "ThinkingModel", "load"]
