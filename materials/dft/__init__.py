"""DFT: GPAW calculations on the MP2020 scale (:mod:`.gpaw`) and DFT results computed elsewhere
(VASP, extxyz: :mod:`.importers`)."""
