"""Data a prediction is compared with or ranked by: reference records (:mod:`.records`), the shipped band-gap
sets and lab files (:mod:`.reference_data`), element supply-risk data (:mod:`.sustainability`), and validation
of predictions against reference data (:mod:`.validation`)."""
