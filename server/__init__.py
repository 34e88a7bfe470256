"""`ruyi-trt serve`: image-to-video jobs over HTTP, with a persistent queue, live progress and a web page.

The top layer beside tools/ and comfyui/; it uses only the public API (`RuyiPipeline`, `VideoRequest`,
`Video.save`). The parts, bottom to top:

- jobs: the SQLite (WAL) queue: accepted jobs with their inputs, their progress and results; survives restarts;
- forms: what a submission may hold, checked before anything is stored (4xx with the field named);
- worker: the process that holds one loaded pipeline and runs jobs sent to it (one per GPU or GPU group);
- executors: how the dispatcher reaches workers: local worker processes (`LocalWorkers`), or Ray Serve replicas;
- dispatcher: moves queued jobs to free workers, records progress, cancels, expires old results;
- app: the FastAPI application (HTTP API, server-sent events, the web page in web/);
- ray_serve: `serve --ray`, the same app as a Ray Serve deployment over GPU worker replicas;
- loadtest: `python -m ruyi_trt.server.loadtest`, a bounded load test against a running server.

Importing this package imports neither torch nor FastAPI.
"""
