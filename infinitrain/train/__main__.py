"""``python -m infinitrain.train --recipe debug ...`` (and ``deepspeed --module infinitrain.train ...``)."""

from infinitrain.train.commands import main

main()
