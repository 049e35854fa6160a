"""MLflow "model from code": the exported sentence-transformers directory as a pyfunc model.

MLflow copies this file into the logged model and runs it on load, so it imports nothing from xling:
serving needs only MLflow and sentence-transformers. Input: a ``text`` column (or a list of strings);
param ``kind``: ``query`` (default) or ``passage``, which picks the prompt and maximum length the model was
trained with. Output: one L2-normalised embedding per row.
"""

from __future__ import annotations

from typing import Any

import mlflow


class SentenceTransformerModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(context.artifacts["sentence_transformer"])

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - MLflow reads type hints as a schema
        texts = model_input["text"].tolist() if hasattr(model_input, "columns") else list(model_input)
        if (params or {}).get("kind", "query") == "passage":
            return self.model.encode_document(texts, convert_to_numpy=True)
        return self.model.encode_query(texts, convert_to_numpy=True)


mlflow.models.set_model(SentenceTransformerModel())
