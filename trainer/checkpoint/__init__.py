"""The run folder on disk: checkpoints written, verified and loaded, and who owns ``run.out``.

manager.py       CheckpointManager: the collective save and load sequences, finding, verifying and pruning checkpoints
files.py         the files of one checkpoint (model, optimizer, scheduler, RNG, state, manifest), by rank 0
layout.py        the names of checkpoint folders and files; the listing of a run's step folders
state.py         the distributed state gathered to rank 0 for a save and spread back at a load
verify.py        whether a checkpoint is whole (marker, manifest, sizes, sha256): CorruptCheckpoint
checkpointer.py  the run's checkpoint decisions: when to save, what a resume restores, where a diverged run goes on
run_folder.py    RunFolder: claiming run.out for a fresh run or a resume (its lock), the start-over commands
"""
