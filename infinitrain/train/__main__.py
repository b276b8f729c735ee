"""``python -m infinitrain.train --recipe debug ...`` (and ``deepspeed --module infinitrain.train ...``)."""

from infinitrain.cli import train_main

train_main()
