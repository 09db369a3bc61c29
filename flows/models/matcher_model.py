"""MLflow model-from-code entry point of the registered ``pair-matcher`` model (see `flows.models`)."""

import mlflow

from flows.train_matcher import MatcherPyfunc

mlflow.models.set_model(MatcherPyfunc())
