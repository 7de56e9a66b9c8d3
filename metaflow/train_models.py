"""TrainModelsFlow: train five classifiers in parallel, evaluate them, record a champion.

    python metaflow/train_models.py run
    python metaflow/train_models.py run --dataset my.csv --target label
    python metaflow/train_models.py card get evaluate card.html   # the evaluation card, as HTML

Every step is a few lines; the work lives in `src/batchscore`. Each step is a process of
its own and imports what it uses inside the step (the launcher and the card process import
this file too): pandas, scikit-learn and matplotlib load only where a step needs them.
"""

import batchscore.orchestration.metaflow_user  # noqa: F401  (before metaflow: a user name it accepts)
from batchscore.orchestration.fail_fast import fail_fast
from batchscore.orchestration.retries import step_retries
from batchscore.training.models import (
    BRANCH_CPUS,
    DEFAULT_THRESHOLD_METRIC,
    MODEL_NAMES,
    THRESHOLD_METRICS,
)
from metaflow import FlowSpec, Parameter, card, current, resources, retry, step, timeout

# Steps whose work is idempotent retry (BATCHSCORE_STEP_RETRIES, default 2).
RETRIES = step_retries()


class TrainModelsFlow(FlowSpec):
    dataset = Parameter(
        "dataset",
        default="breast_cancer",
        help="`breast_cancer`, or a CSV/Parquet path or URL (file, s3://, http)",
    )
    target = Parameter("target", default="", help="label column of a file dataset")
    positive_class = Parameter(
        "positive_class",
        default="",
        help="label value that counts as positive (default: 1, True or yes-like; needed "
        "for other text labels)",
    )
    test_size = Parameter("test_size", default=0.2, type=float, help="share of rows held out")
    random_state = Parameter("random_state", default=42, type=int)
    cv_folds = Parameter("cv_folds", default=5, type=int, help="cross-validation folds")
    threshold_metric = Parameter(
        "threshold_metric",
        default=DEFAULT_THRESHOLD_METRIC,
        help=f"what each model's decision threshold maximises on CV folds: {THRESHOLD_METRICS}",
    )

    @step
    def start(self):
        """Say where data, metrics and models will go; stop now if a service is unreachable."""
        from batchscore.config import Settings
        from batchscore.orchestration.preflight import require_services
        from batchscore.orchestration.report import print_mapping
        from batchscore.training.models import check_threshold_metric

        check_threshold_metric(self.threshold_metric)
        print_mapping("batchscore services", Settings().describe())
        require_services(Settings())
        self.next(self.load_and_prepare_data)

    @retry(times=RETRIES)
    @fail_fast
    @step
    def load_and_prepare_data(self):
        """Load, split, and publish the test split as the batch flow's default input."""
        from batchscore.config import Settings
        from batchscore.training.steps import prepare_data

        self.data = prepare_data(
            self.dataset,
            self.target or None,
            self.test_size,
            self.random_state,
            Settings(),
            self.positive_class or None,
            run_id=f"{current.flow_name}/{current.run_id}",
        )
        self.model_names = list(MODEL_NAMES)
        self.next(self.train_model, foreach="model_names")

    @resources(cpu=BRANCH_CPUS, memory=4096)
    @timeout(hours=2)
    @step
    def train_model(self):
        """One branch per model: grid search, then its threshold, by cross-validation."""
        from batchscore.training.models import train_model

        self.trained = train_model(
            self.input,
            self.data.train_features,
            self.data.train_labels,
            self.cv_folds,
            self.random_state,
            self.threshold_metric,
        )
        self.next(self.join_models)

    @step
    def join_models(self, inputs):
        """Gather the tuned models."""
        self.trained = {branch.trained.name: branch.trained for branch in inputs}
        self.merge_artifacts(inputs, include=["data"])
        self.next(self.evaluate)

    @card(type="blank")
    @step
    def evaluate(self):
        """Test-split metrics and figures; the champion is chosen by CV, not by these."""
        from batchscore.orchestration.report import card_components
        from batchscore.training.evaluation import metrics_only  # matplotlib: this step only
        from batchscore.training.models import choose_champion
        from batchscore.training.steps import evaluate_all, reference_profile

        results, self.pngs = evaluate_all(self.trained, self.data)
        self.metrics = metrics_only(results)
        self.cv_scores = {name: model.cv_score for name, model in self.trained.items()}
        self.thresholds = {name: model.threshold for name, model in self.trained.items()}
        self.champion = choose_champion(self.trained)
        # The drift gate's yardstick, built here where the models are already loaded.
        self.profile = reference_profile(self.trained[self.champion], self.data)
        current.card.extend(
            card_components(
                self.metrics, self.cv_scores, self.champion, self.pngs, self.data.classes[1]
            )
        )
        self.next(self.store_results)

    @retry(times=RETRIES)
    @step
    def store_results(self):
        """Models and plots to the store, metrics and the champion to the database."""
        from batchscore.config import Settings
        from batchscore.training.steps import save_training

        saved = save_training(
            f"{current.flow_name}/{current.run_id}",
            self.trained,
            self.metrics,
            self.pngs,
            self.champion,
            self.data,
            Settings(),
            self.target or None,
            self.profile,
        )
        self.model_uris, self.plot_uris = saved.model_uris, saved.plot_uris
        self.next(self.end)

    @step
    def end(self):
        """The summary: every model's metrics and the champion."""
        from batchscore.orchestration.report import print_mapping, print_metrics

        print_metrics(self.metrics, self.cv_scores, self.champion)
        print_mapping("thresholds", self.thresholds)  # label 1: proba >= threshold
        print(f"champion: {self.champion} -> {self.model_uris[self.champion]}")
        print(f"card: python metaflow/train_models.py card get {current.run_id}/evaluate card.html")


if __name__ == "__main__":
    TrainModelsFlow()
