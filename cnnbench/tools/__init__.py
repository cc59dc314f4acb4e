"""Commands built on the layers below: bench, GPU check, chaos test, MLflow UI
screenshots, notebook reports, the documents' counts."""
