"""BatchProcessingFlow: score a table with the trained champion, publish it to Redis.

    python metaflow/batch_processing.py run
    python metaflow/batch_processing.py run --input_path s3://batch/incoming.parquet --models all

Shards are scored in parallel (`--max-workers` locally, one pod each on Kubernetes) into
a staged Redis version; `ingest_redis` switches readers to it once every shard landed.
"""

import batchscore.metaflow_user  # noqa: F401  (before metaflow: a user name it accepts)
from batchscore.batch import default_input, load_models, plan_shards, publish, score_shard, stage
from batchscore.config import Settings
from batchscore.fail_fast import fail_fast
from batchscore.online import new_version, ttl_seconds
from batchscore.preflight import require_services
from batchscore.report import print_mapping
from metaflow import FlowSpec, Parameter, current, resources, retry, step, timeout

# Steps whose work is idempotent retry (BATCHSCORE_STEP_RETRIES, default 2).
RETRIES = Settings().step_retries


class BatchProcessingFlow(FlowSpec):
    input_path = Parameter(
        "input_path",
        default="",
        help="CSV/Parquet path or URL (file, s3://, http); default: the published test split",
    )
    models = Parameter("models", default="champion", help="`champion`, or `all` to add every model")
    shard_rows = Parameter("shard_rows", default=100_000, type=int, help="rows per parallel shard")
    ttl_days = Parameter(
        "ttl_days",
        default=0.0,
        type=float,
        help="key lifetime in days; 0 (default): keys live until a newer version retires them",
    )

    @step
    def start(self):
        """Name this run's prediction-set version: sortable by start time. Stop now if a
        service is unreachable."""
        require_services(Settings())
        self.run_pathspec = f"{current.flow_name}/{current.run_id}"
        self.version = new_version(self.run_pathspec)
        self.next(self.load_model)

    @retry(times=RETRIES)
    @fail_fast
    @step
    def load_model(self):
        """The recorded champion (or all models), checked against its SHA-256 before loading."""
        self.bundle = load_models(self.models, Settings())
        self.model_name = self.bundle.champion
        self.next(self.load_data)

    @resources(cpu=1, memory=4096)
    @retry(times=RETRIES)
    @fail_fast
    @step
    def load_data(self):
        """Validate every input row against the model's schema, cut it into shards."""
        settings = Settings()
        self.input_uri = self.input_path or default_input(settings)
        self.shards = plan_shards(
            self.input_uri,
            self.bundle.feature_columns,
            self.shard_rows,
            self.run_pathspec,
            settings,
        )
        stage(
            self.version,
            self.run_pathspec,
            self.input_uri,
            self.bundle,
            settings,
            ttl_seconds(self.ttl_days),
        )
        self.next(self.batch_processing, foreach="shards")

    @resources(cpu=2, memory=4096)
    @retry(times=RETRIES)
    @timeout(hours=2)
    @fail_fast
    @step
    def batch_processing(self):
        """One shard: key, predict, write under the staged version."""
        self.shard = score_shard(
            self.index,
            self.input,
            self.bundle,
            self.version,
            Settings(),
            ttl_seconds(self.ttl_days),
        )
        self.next(self.ingest_redis)

    @retry(times=RETRIES)
    @fail_fast
    @step
    def ingest_redis(self, inputs):
        """Check every shard's keys landed, then switch readers to the new version."""
        self.merge_artifacts(
            inputs,
            include=["run_pathspec", "version", "bundle", "input_uri", "model_name", "shards"],
        )
        result = publish(
            self.run_pathspec,
            self.version,
            [i.shard for i in inputs],
            self.input_uri,
            self.bundle,
            Settings(),
            scratch=self.shards,
        )
        self.rows_scored, self.keys_written = result.rows_scored, result.keys_written
        self.published = result.published
        self.next(self.end)

    @step
    def end(self):
        """What was published, and where."""
        print_mapping(
            "batch run",
            {
                "input": self.input_uri,
                "model": self.model_name,
                "version": self.version,
                "published": self.published,
                "rows scored": self.rows_scored,
                "keys written": self.keys_written,
            },
        )


if __name__ == "__main__":
    BatchProcessingFlow()
