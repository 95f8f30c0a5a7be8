"""Worked solution for notebook 11."""


def engine_step(scheduler, runner, now):
    out = scheduler.schedule()  # who runs, how many tokens, which blocks (allocated here, before the forward)
    tokens = runner.execute(out)  # one batched forward; {seq_id: new token}
    return scheduler.postprocess(out, tokens, now)  # append tokens, retire what finished
