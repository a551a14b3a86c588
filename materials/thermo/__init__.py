"""Thermodynamic stability: elemental energies, MP2020 corrections, the Materials Project hull table, formation
energies and signed hull distances (:mod:`.stability`)."""
