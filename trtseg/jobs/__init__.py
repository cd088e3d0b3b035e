"""trtseg.jobs: `trtseg predict` as a Ray batch job.

    config.py   JobConfig: everything a run needs, plain data
    stages.py   the work done inside Ray workers: prepare (read + preprocess), infer a chunk of tiles, reduce
                (sum partial logits, export, write)
    actor.py    InferenceActor: one per GPU (or --cpu-actors N), owning its engines, context and stream
    driver.py   run_job: lists cases, skips finished ones, keeps several volumes in flight, spreads each volume's
                tiles over all actors, writes run_report.json
"""
