"""Checkpoint I/O: lazy reading of HF model folders, atomic streaming writing, side files, cards."""

from alloy.io.atomic import AtomicFolder
from alloy.io.card import CardInput, model_card
from alloy.io.checkpoint import Checkpoint
from alloy.io.format import TensorInfo
from alloy.io.modelinfo import ModelInfo
from alloy.io.sidefiles import choose_donor
from alloy.io.writable import check_writable, write_file
from alloy.io.writer import CheckpointWriter, TensorSpec, save_state_dict

__all__ = [
    "AtomicFolder",
    "CardInput",
    "Checkpoint",
    "CheckpointWriter",
    "ModelInfo",
    "TensorInfo",
    "TensorSpec",
    "check_writable",
    "choose_donor",
    "model_card",
    "save_state_dict",
    "write_file",
]
