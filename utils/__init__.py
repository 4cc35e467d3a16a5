"""Quick, Draw! doodle classification: data, models, training, evaluation, plots and strokes."""
