"""`tune report`: what a study found, as Markdown, pictures and MLflow artifacts; studies side by side."""
