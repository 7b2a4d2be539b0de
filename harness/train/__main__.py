"""``python -m harness.train``, ``accelerate launch -m harness.train`` and ``torchrun -m harness.train``:
the ``harness adapt`` command in every process of a distributed launch."""
from harness.train.command import main

main()
