"""The MLflow model of a saved earlycrop folder that plain transformers cannot load (a global layout, a GPT-2 or
BERT head cut). Logged as "models from code": MLflow copies this file next to the folder and runs it when the
model is logged and loaded, so loading needs earlycrop and transformers, not this pipeline.

No `from __future__ import annotations`: MLflow reads `predict`'s type hints as types (its input check).
"""

import mlflow
from mlflow.pyfunc import PythonModel


class EarlycropModel(PythonModel):
    """`model` and `tokenizer` are the folder loaded through earlycrop.from_pretrained; `predict(texts)` gives
    the logits at each text's last token (a classifier's class scores, a language model's next-token scores)."""

    def load_context(self, context) -> None:
        import earlycrop
        from transformers import AutoTokenizer

        folder = context.artifacts["model"]
        self.model = earlycrop.from_pretrained(folder).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def predict(self, model_input: list[str], params=None) -> list[list[float]]:
        import torch

        rows = []
        with torch.no_grad():
            for text in model_input:  # one at a time: no padding to get wrong
                logits = self.model(**self.tokenizer(text, return_tensors="pt")).logits[0]
                rows.append((logits[-1] if logits.dim() == 2 else logits).tolist())
        return rows


mlflow.models.set_model(EarlycropModel())
