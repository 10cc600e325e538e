"""Public calibration text: what a client measures h_p's scale on before it sends anything.

A model-relative noise level (``relative_sigma``: sigma as a multiple of the per-coordinate
RMS of h_p) needs h_p's RMS, and a scale measured on the client's own data would leak a
little about that data. These sentences are neutral, encyclopedic English written for
fedsea (no dataset's text), long enough to give 32 tokens each, so the measurement is the
same on every client and on every machine, offline. On SmolLM2-135M-Instruct their RMS is
within a few percent of the RMS measured on 200 XSum documents at every cut point tested
(``tests/slow/test_privacy_smollm2.py``).
"""

from __future__ import annotations

PUBLIC_TEXT: tuple[str, ...] = (
    "The river rises in the northern hills and flows south for about three hundred kilometres before it "
    "reaches the sea near the old port town.",
    "In the winter months the village market opens only on Saturdays, when farmers bring cheese, apples "
    "and firewood from the surrounding valleys.",
    "The library was founded in the nineteenth century by a group of teachers who wanted the town's "
    "children to have free access to books.",
    "A new railway line will connect the two cities by the end of the decade, cutting the journey time "
    "from four hours to less than two.",
    "Bees collect nectar from flowers and turn it into honey, which they store in wax cells to feed the "
    "colony through the cold season.",
    "The committee met on Tuesday to discuss the budget for next year and agreed to spend more on "
    "repairing roads and school buildings.",
    "Most of the island is covered by forest, and the few roads that cross it are often closed after "
    "heavy rain in the autumn.",
    "The museum's collection includes paintings, maps and tools that show how people in the region lived "
    "and worked two hundred years ago.",
    "Scientists measured the temperature of the lake every month for ten years and found that the water "
    "has become slightly warmer.",
    "The bakery on the corner sells fresh bread every morning, and by noon there is usually nothing left "
    "on its shelves but a few rolls.",
    "During the festival the main square is filled with music, food stalls and families who come from "
    "all over the country to celebrate.",
    "The company said its profits fell in the third quarter because of higher energy prices and weaker "
    "demand for its products abroad.",
    "Children in the primary school learn to read and write in two languages, and many of them also "
    "study music from an early age.",
    "The bridge was closed for repairs last spring, so drivers had to take a longer route through the "
    "industrial estate for several weeks.",
    "Astronomers observed a bright comet passing close to the sun, and amateur watchers could see its "
    "tail for several nights in a row.",
    "The hospital opened a new ward for older patients, with more nurses on every shift and a small "
    "garden where visitors can sit.",
    "Wheat, barley and potatoes are the main crops grown in the area, although some farmers have started "
    "to plant vineyards as well.",
    "The team won its final match of the season by two goals to one, with the winning goal scored in "
    "the last minute of the game.",
    "Visitors to the castle can climb the tower, walk along the walls and learn about the families who "
    "lived there over six centuries.",
    "The government announced a plan to build thousands of new homes, saying that young people find it "
    "too hard to rent or buy a flat.",
    "Heavy snow fell across the region overnight, closing several schools and causing delays for people "
    "travelling to work by train.",
    "The old mill has been turned into a community centre, where people meet for classes, concerts and "
    "a weekly lunch for elderly residents.",
    "Researchers at the university are studying how birds find their way over long distances during "
    "their yearly migration to the south.",
    "The town council has asked residents for ideas about how to use the empty land next to the station "
    "once the old warehouses are removed.",
)
