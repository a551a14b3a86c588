"""Interatomic potentials: name -> ASE calculator (:mod:`.calculators`), relaxation one structure at a time
(:mod:`.relax`) and batched on torch-sim models (:mod:`.batched`), fine-tuning MACE on DFT (:mod:`.finetune`)."""
