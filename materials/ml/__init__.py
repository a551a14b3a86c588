"""Machine-learned properties: element property table (:mod:`.elements`), descriptors for Bayesian optimisation
(:mod:`.features`), the band-gap GNN ensemble (:mod:`.bandgap`)."""
