"""OpenAI-compatible serving: `python -m ringlet serve` (see README "Serving").

    command.py      flags, one-rank and multi-rank start-up
    server.py       uvicorn beside the engine thread, graceful stop
    app.py          the HTTP routes
    protocol.py     request checking (-> token ids + SamplingParams) and the response/chunk/error shapes
    engine_loop.py  the one thread that drives the engine(s), admission control (429)
    metrics.py      the Prometheus metrics
Routing over data-parallel replicas lives in ringlet.mpi.serve_router.
"""
