"""Crystal structures: reading and checking the user's files (:mod:`.inputs`), generating candidates from
prototypes (:mod:`.candidates`)."""
