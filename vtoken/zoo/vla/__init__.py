"""The bundled tiny VLA's recipe: model and prompt (``model``), noisy-expert demonstrations
(``data``), training batches (``batches``), behaviour cloning (``config``, ``train``), export with
the measured model card (``export``, ``card``; the rollouts are ``vtoken eval rollout``'s).

Commands (run from the repository root; outputs under ``runs/``)::

    python -m vtoken.zoo.vla.data --episodes 8000 --out runs/vla_data/reach
    OMP_WAIT_POLICY=PASSIVE python -m vtoken.zoo.vla.train --run-dir runs/vla_reach [--resume]
    vtoken eval rollout --model runs/vla_reach/last.pt --env vtoken/TabletopReach-v0 --episodes 200
    python -m vtoken.zoo.vla.export --run-dir runs/vla_reach --name tabletop-vla-tiny

The exported folder loads with ``vtoken.zoo.load(name)`` (stock ``LlavaForConditionalGeneration``)
and ``vtoken.robot.policy.ActionTokenizer.load(folder)``.
"""
