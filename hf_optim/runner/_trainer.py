"""The Trainer side of ``hf-optim train``: the recipe's Trainer subclass, the compact progress bar, the step-0 point.

Classes are built inside functions so that importing :mod:`hf_optim.runner.train` (for ``--help`` or a recipe
mistake) does not import transformers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from . import build, schema
from .schedules import make_scheduler


@contextlib.contextmanager
def config_errors(what: str) -> Iterator[None]:
    """Turn a ``ValueError`` raised while applying the recipe into a :class:`~hf_optim.runner.schema.RecipeError`.

    Only around steps driven by the recipe's values (corpus, model config, schedule, optimizer), so that ``main``
    can report a configuration mistake in one line while a genuine bug elsewhere keeps its traceback.
    """
    try:
        yield
    except schema.RecipeError:
        raise
    except (ValueError, TypeError) as error:
        raise schema.RecipeError(f"{what}: {error}") from error


def make_trainer_class():
    from transformers import Trainer

    class RecipeTrainer(Trainer):
        """Trainer whose optimizer, decay groups and lr schedule come from a recipe.

        ``schedule_fit`` (a :class:`hf_optim.runner.horizon.Fit`) holds the schedule fitted to the run's length;
        without it the recipe's schedule is built as stated (``build.build_scheduler``).
        """

        def __init__(
            self,
            *args: Any,
            recipe: Mapping[str, Any],
            deepspeed: bool = False,
            schedule_fit: Any = None,
            **kwargs: Any,
        ) -> None:
            self.recipe = recipe
            self._deepspeed = deepspeed
            self.schedule_fit = schedule_fit
            super().__init__(*args, **kwargs)

        def get_decay_parameter_names(self, model):
            return build.decay_parameter_names(model, (self.recipe.get("optimizer") or {}).get("no_decay"))

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                # Built here, not in main(): under FSDP2 the model is sharded first and muP overrides must be keyed
                # by the sharded Parameters.
                opt_model = self.model if model is None else model
                with config_errors("optimizer"):
                    cls, kwargs = build.optimizer_cls_and_kwargs(self.recipe, opt_model)
                    kwargs = build.check_deepspeed(
                        cls,
                        kwargs,
                        deepspeed=self._deepspeed,
                        fallback=bool(self.recipe.get("run", {}).get("unfactored_fallback")),
                    )
                self.optimizer_cls_and_kwargs = (cls, kwargs)
            return super().create_optimizer(model)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                optimizer = optimizer or self.optimizer
                fit = self.schedule_fit
                with config_errors("schedule"):
                    if fit is not None and fit.run_steps == num_training_steps:
                        self.lr_scheduler = make_scheduler(optimizer, fit.schedule, **fit.kwargs)
                    else:
                        self.lr_scheduler = build.build_scheduler(self.recipe, optimizer, num_training_steps)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return RecipeTrainer


def step_zero_callback_class():
    from transformers import TrainerCallback

    class StepZeroEval(TrainerCallback):
        """Put the validation loss measured before training into the Trainer's log history as step 0.

        ``trainer.train()`` starts a fresh ``TrainerState``, so the value from ``trainer.evaluate()`` before it would
        otherwise be lost; stored in the state, it is also saved in every checkpoint's ``trainer_state.json``, so a
        resumed run's ``metrics.json`` and ``loss.png`` keep the step-0 point.
        """

        def __init__(self, eval_loss: float | None) -> None:
            self.eval_loss = eval_loss

        def on_train_begin(self, args, state, control, **kwargs):
            if (
                self.eval_loss is not None
                and state.global_step == 0
                and not any(r.get("step") == 0 and "eval_loss" in r for r in state.log_history)
            ):
                state.log_history.insert(0, {"eval_loss": self.eval_loss, "step": 0})

    return StepZeroEval


def progress_callback_class():
    from transformers.trainer_callback import ProgressCallback

    class CompactProgress(ProgressCallback):
        """The Trainer's tqdm bar, with one short line per log instead of the full log dict.

        The full dict (per-group ``lr/group_i`` etc.) still goes to ``trainer.state.log_history`` and metrics.json.
        """

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            pass  # validation takes a few batches: its result line is enough, a second bar only flickers

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            head = f"step {state.global_step:>{len(str(state.max_steps))}}/{state.max_steps}"
            if "loss" in logs:
                line = f"{head}  loss {float(logs['loss']):.3f}"
                if "learning_rate" in logs:
                    line += f"  lr {float(logs['learning_rate']):.2e}"
                if logs.get("grad_norm") is not None:
                    line += f"  grad norm {float(logs['grad_norm']):.2f}"
            elif "eval_loss" in logs:
                line = f"{head}  validation loss {float(logs['eval_loss']):.3f}"
            else:
                return  # the end-of-training runtime summary: main() prints its own
            self.training_bar.write(line)

    return CompactProgress
