"""The instructflow pipeline as a Prefect flow: the table of contents of the whole project.

Each stage is a Prefect task that runs its DVC stage (`dvc repro --single-item <stage>`), so DVC decides
whether it must run (code, data, params; dvc.yaml and dvc.lock). The flow states the graph; Prefect's UI
draws the same one. MLflow gets one parent run per pipeline run, under which every stage that runs opens
its nested run. The mechanics (DVC calls, what ran, retries) live in flows/stage_task.py.
"""

from __future__ import annotations

from prefect import flow

from flows.stage_task import StageFailed, pipeline_run, run_stage


@flow(name="instructflow-pipeline", log_prints=True)
def pipeline(preset: str | None = None, overrides: list[str] | None = None, root: str | None = None) -> list[dict]:
    """Validate params (with overrides) and write them to params.yaml, then run the stages in graph order."""
    with pipeline_run(preset, overrides or [], root) as ctx:
        def stage(name: str, *after):  # a stage task that starts once the stages it reads from are done
            return run_stage.with_options(name=name, task_run_name=name).submit(name, ctx, wait_for=list(after))

        prepare = stage("prepare")
        tokenizer = stage("tokenizer", prepare)

        # decoder track (InstructGPT): pretrain -> SFT -> reward model and preference optimisation -> evaluate
        pretrain = stage("pretrain", tokenizer)
        sft = stage("sft", pretrain)
        reward = stage("reward", sft)
        align = stage("align", sft, reward)
        evaluate = stage("evaluate", align, reward)
        # the feedback loop (loop.enabled; `instructflow rounds` repeats it): K samples of the policy, ranked
        generate = stage("generate", align)
        rank = stage("rank", generate)
        self_instruct = stage("self_instruct", sft)  # optional (self_instruct.enabled): new instructions from a model

        # encoder track (BERT): masked-LM pretraining -> [CLS] classifier and sentence embeddings (KorSTS);
        # it does not wait for the decoder
        mlm = stage("mlm", tokenizer)
        classify = stage("classify", mlm)
        similarity = stage("similarity", mlm)

        register = stage("register", evaluate, classify, similarity)

        futures = [prepare, tokenizer, pretrain, sft, reward, align, evaluate, self_instruct, generate, rank, mlm, classify,
                   similarity, register]
        return ctx.collect(futures)


__all__ = ["StageFailed", "pipeline"]
