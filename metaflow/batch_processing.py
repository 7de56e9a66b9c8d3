"""BatchProcessingFlow: score a table with the trained champion, publish it to Redis.

    python metaflow/batch_processing.py run
    python metaflow/batch_processing.py run --input_path s3://batch/incoming.parquet --models all

start -> load_data (plan shards from the input's metadata) -> load_model (fetch and verify
the models, stage a version) -> batch_processing (foreach shard: read its own rows from the
input, check, score, write to Redis; one per core locally, one pod each on Kubernetes) ->
ingest_redis (gate, switch readers once every shard landed) -> end.

Every step is a fresh process: each imports only what it uses, inside the step, so the
steps around the foreach cost little more than Metaflow's own start-up (the file itself
imports nothing heavy: the launcher and the card process import it too).
"""

import batchscore.orchestration.metaflow_user  # noqa: F401  (before metaflow: a user name it accepts)
from batchscore.orchestration.fail_fast import fail_fast
from batchscore.orchestration.retries import step_retries
from metaflow import FlowSpec, Parameter, card, current, resources, retry, step, timeout

# Steps whose work is idempotent retry (BATCHSCORE_STEP_RETRIES, default 2).
RETRIES = step_retries()


class BatchProcessingFlow(FlowSpec):
    input_path = Parameter(
        "input_path",
        default="",
        help="CSV/Parquet path or URL (file, s3://, http); default: the published test split. "
        "Name credentials as environment variables, '${NAME}' (expanded only where the input "
        "is read, so Metaflow records the template)",
    )
    models = Parameter("models", default="champion", help="`champion`, or `all` to add every model")
    shard_rows = Parameter(
        "shard_rows",
        default=0,
        type=int,
        help="rows per parallel shard; 0 (default): a shard per started 50,000 rows, at most one "
        "per core",
    )
    ttl_days = Parameter(
        "ttl_days",
        default=0.0,
        type=float,
        help="key lifetime in days; 0 (default): keys live until a newer version retires them",
    )
    bad_rows = Parameter(
        "bad_rows",
        default="reject",
        help="`reject` (any bad row fails the input) or `quarantine` (set bad rows aside "
        "in rejected.csv, score the rest)",
    )
    max_bad_rows = Parameter(
        "max_bad_rows", default=0.0, type=float, help="share of rejected rows the gate allows"
    )
    max_drift = Parameter(
        "max_drift",
        default=0.25,
        type=float,
        help="largest per-feature population stability index the gate allows",
    )

    @retry(times=RETRIES)
    @fail_fast
    @step
    def start(self):
        """Stop now on a parameter out of range or an unreachable service; name the version
        (sortable by start time); find the input and the recorded models."""
        from batchscore.batch.bundle import find_champion
        from batchscore.batch.parameters import BatchParameters
        from batchscore.config import Settings
        from batchscore.orchestration.preflight import require_services
        from batchscore.versions import new_version

        parameters = BatchParameters(
            self.models,
            self.shard_rows,
            self.ttl_days,
            self.bad_rows,
            self.max_bad_rows,
            self.max_drift,
            self.input_path,
        )
        parameters.check()  # `${NAME}` in --input_path: each variable set
        parameters.warn()  # credentials written out in --input_path: recorded by Metaflow
        settings = Settings()
        require_services(settings)
        self.run_pathspec = f"{current.flow_name}/{current.run_id}"
        self.version = new_version(self.run_pathspec)
        champion = find_champion(self.models, settings)  # one read: input and models agree
        self.input_uri = self.input_path or champion.batch_input_uri
        self.records = champion.records
        self.model_name = self.records[0].model
        self.feature_columns = self.records[0].feature_columns
        self.next(self.load_data)

    @retry(times=RETRIES)
    @fail_fast
    @step
    def load_data(self):
        """Plan the input into shards from its metadata (Parquet footers, CSV headers and
        byte ranges, the files of a directory, glob or prefix): no row is read here, each
        shard reads and checks its own (one shard per core locally unless `--shard_rows`)."""
        from batchscore.batch.shards import plan_shards
        from batchscore.config import Settings

        self.plan = plan_shards(
            self.input_uri,
            self.feature_columns,
            self.shard_rows or None,
            self.run_pathspec,
            Settings(),
            self.bad_rows,
        )
        self.shards = self.plan.shards
        self.next(self.load_model)

    @retry(times=RETRIES)
    @fail_fast
    @step
    def load_model(self):
        """Fetch the models' bytes, each checked against its SHA-256 (deserialised only by
        the shard tasks, the steps that need scikit-learn), then stage the run's version."""
        from batchscore.batch.bundle import fetch_models
        from batchscore.batch.publishing import stage
        from batchscore.config import Settings
        from batchscore.online.store import ttl_seconds
        from batchscore.storage.sources import masked

        settings = Settings()
        self.model_files = fetch_models(self.records, settings)
        stage(
            self.version,
            self.run_pathspec,
            masked(self.input_uri),  # the manifest (and `GET /v1/status`) never show secrets
            self.model_files,
            settings,
            ttl_seconds(self.ttl_days),
            expected_rows=self.plan.rows_read,
        )
        self.next(self.batch_processing, foreach="shards")

    @resources(cpu=2, memory=4096)
    @retry(times=RETRIES)
    @timeout(hours=2)
    @fail_fast
    @step
    def batch_processing(self):
        """One shard: read its rows from the input and check them, deserialise the models,
        key, predict, write under the staged version."""
        from batchscore.batch.scoring import score_shard
        from batchscore.config import Settings
        from batchscore.online.store import ttl_seconds
        from batchscore.sizing import scoring_threads, step_cores

        settings = Settings()
        cores = step_cores(self, current.step_name)
        self.shard = score_shard(
            self.index,
            self.input,
            self.model_files.load(),
            self.version,
            settings,
            ttl_seconds(self.ttl_days),
            threads=scoring_threads(len(self.shards), cores, settings.scoring_threads),
        )
        self.next(self.ingest_redis)

    @card(type="blank")
    @retry(times=RETRIES)
    @fail_fast
    @step
    def ingest_redis(self, inputs):
        """Gate the batch (drift, rejected rows), check every shard's keys landed, then
        switch readers to the new version; the batch report is this step's card."""
        from batchscore.batch.publishing import GateLimits, publish
        from batchscore.batch.report import card_components
        from batchscore.batch.shards import merge_rejected
        from batchscore.config import Settings
        from batchscore.storage.sources import masked

        self.merge_artifacts(
            inputs,
            include=[
                "run_pathspec", "version", "model_files", "input_uri", "model_name", "shards",
                "plan",
            ],
        )  # fmt: skip
        settings = Settings()
        results = [i.shard for i in inputs]
        self.plan = merge_rejected(self.plan, results, settings)
        result = publish(
            self.run_pathspec,
            self.version,
            results,
            masked(self.input_uri),
            self.model_files,
            settings,
            plan=self.plan,
            limits=GateLimits(self.max_drift, self.max_bad_rows),
        )
        self.rows_scored, self.keys_written = result.rows_scored, result.keys_written
        self.published = result.published
        self.superseded_by = result.superseded_by  # a newer run went live meanwhile
        self.gate = result.report.gate.summary if result.report else "not checked"
        self.report = result.report.summary_lines() if result.report else {}
        if result.report:
            current.card.extend(card_components(result.report))
        self.next(self.end)

    @fail_fast
    @step
    def end(self):
        """What was published, and where; a batch the gate blocked, or superseded by a newer
        run while it wrote, ends the run non-zero."""
        from batchscore.batch.gate import GateBlocked
        from batchscore.batch.publishing import SupersededRun
        from batchscore.orchestration.report import print_mapping
        from batchscore.storage.sources import masked

        print_mapping(
            "batch run",
            {
                "input": masked(self.input_uri),
                "model": self.model_name,
                "version": self.version,
                "published": self.published,
                "rows scored": self.rows_scored,
                "keys written": self.keys_written,
                **self.report,
                "gate": self.gate,
                "card": f"python metaflow/batch_processing.py card get {current.run_id}"
                "/ingest_redis card.html",
            },
        )
        if self.gate.startswith("blocked"):
            raise GateBlocked(
                f"{self.version} {self.gate}. It stays staged: see the card "
                f"(python metaflow/batch_processing.py card get {current.run_id}/ingest_redis "
                "card.html), then "
                f"`python -m batchscore promote {self.version}` to publish it anyway"
            )
        if self.superseded_by:
            raise SupersededRun(self.version, self.superseded_by)


if __name__ == "__main__":
    BatchProcessingFlow()
