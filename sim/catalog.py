"""Static and generated vocabularies for the simulator: people, places, devices, artists and songs.

All names are synthetic or common first/last names; the catalogue is Zipf-like so a few artists and
songs dominate plays, as in real listening logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FIRST_NAMES_F = (
    "Emma", "Olivia", "Ava", "Sophia", "Mia", "Harper", "Ella", "Chloe", "Grace", "Lily", "Zoe", "Nora",
    "Riley", "Aria", "Layla", "Hannah", "Maya", "Alexa", "Brooke", "Kayla", "Jasmine", "Paige", "Sienna",
)  # fmt: skip
FIRST_NAMES_M = (
    "Liam", "Noah", "Mason", "Ethan", "Logan", "Lucas", "Jacob", "Aiden", "Colin", "Micah", "Owen",
    "Caleb", "Ryan", "Nathan", "Isaac", "Dylan", "Adrian", "Julian", "Miles", "Jordan", "Tyler", "Evan",
)  # fmt: skip
LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Wilson", "Anderson", "Taylor", "Thomas", "Moore", "Jackson", "Martin", "Lee", "Thompson", "White",
    "Harris", "Clark", "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Freeman",
    "Long", "Hill", "Green", "Adams", "Baker", "Nelson", "Carter", "Mitchell", "Perez", "Roberts", "Turner",
)  # fmt: skip

# (metro area as eventsim writes it, UTC offset in hours, relative population)
LOCATIONS = (
    ("New York-Newark-Jersey City, NY-NJ-PA", -5, 20.0),
    ("Los Angeles-Long Beach-Anaheim, CA", -8, 13.0),
    ("Chicago-Naperville-Elgin, IL-IN-WI", -6, 9.5),
    ("Dallas-Fort Worth-Arlington, TX", -6, 7.0),
    ("Houston-The Woodlands-Sugar Land, TX", -6, 6.5),
    ("Washington-Arlington-Alexandria, DC-VA-MD-WV", -5, 6.0),
    ("Miami-Fort Lauderdale-West Palm Beach, FL", -5, 6.0),
    ("Philadelphia-Camden-Wilmington, PA-NJ-DE-MD", -5, 6.0),
    ("Atlanta-Sandy Springs-Roswell, GA", -5, 5.5),
    ("Boston-Cambridge-Newton, MA-NH", -5, 5.0),
    ("Phoenix-Mesa-Scottsdale, AZ", -7, 4.5),
    ("San Francisco-Oakland-Hayward, CA", -8, 4.5),
    ("Seattle-Tacoma-Bellevue, WA", -8, 4.0),
    ("Minneapolis-St. Paul-Bloomington, MN-WI", -6, 3.5),
    ("San Diego-Carlsbad, CA", -8, 3.3),
    ("Denver-Aurora-Lakewood, CO", -7, 2.8),
    ("St. Louis, MO-IL", -6, 2.8),
    ("Portland-Vancouver-Hillsboro, OR-WA", -8, 2.4),
    ("Bakersfield, CA", -8, 0.9),
    ("Raleigh, NC", -5, 1.3),
    ("Salt Lake City, UT", -7, 1.2),
    ("Kansas City, MO-KS", -6, 2.1),
    ("Columbus, OH", -5, 2.0),
    ("Nashville-Davidson--Murfreesboro--Franklin, TN", -6, 1.8),
)

# Relative frequency mirrors a desktop-heavy 2018 web player; some values carry literal quotes as in Sparkify.
USER_AGENTS = (
    ("Mozilla/5.0 (Windows NT 6.1; WOW64; rv:31.0) Gecko/20100101 Firefox/31.0", 4.0),
    (
        '"Mozilla/5.0 (Windows NT 6.1; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) '
        'Chrome/37.0.2062.103 Safari/537.36"',
        6.0,
    ),
    (
        '"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_4) AppleWebKit/537.36 (KHTML, like Gecko) '
        'Chrome/36.0.1985.143 Safari/537.36"',
        5.0,
    ),
    (
        '"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_9_4) AppleWebKit/537.77.4 (KHTML, like Gecko) '
        'Version/7.0.5 Safari/537.77.4"',
        3.0,
    ),
    ("Mozilla/5.0 (Windows NT 6.1; WOW64; Trident/7.0; rv:11.0) like Gecko", 2.0),
    (
        '"Mozilla/5.0 (iPhone; CPU iPhone OS 7_1_2 like Mac OS X) AppleWebKit/537.51.2 (KHTML, like Gecko) '
        'Version/7.0 Mobile/11D257 Safari/9537.53"',
        2.5,
    ),
    ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:31.0) Gecko/20100101 Firefox/31.0", 1.0),
    (
        '"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) '
        'Chrome/70.0.3538.77 Safari/537.36"',
        4.0,
    ),
)

_ARTIST_WORDS_A = (
    "Velvet", "Neon", "Silver", "Paper", "Electric", "Midnight", "Crimson", "Golden", "Hollow", "Wild",
    "Static", "Lunar", "Broken", "Glass", "Atomic", "Northern", "Quiet", "Burning", "Cosmic", "Saint",
)  # fmt: skip
_ARTIST_WORDS_B = (
    "Foxes", "Harbor", "Echoes", "Wolves", "Parade", "Machines", "Orchard", "Pilots", "Rivers", "Kings",
    "Sparrows", "Circuit", "Lanterns", "Tigers", "Avenue", "Ghosts", "Satellites", "Collective", "Union",
)  # fmt: skip
_SONG_WORDS_A = (
    "Midnight", "Summer", "Falling", "Golden", "Lonely", "Electric", "Broken", "Sweet", "Endless", "Secret",
    "Dancing", "Silent", "Burning", "Faded", "Little", "Wild", "Heavy", "Blue", "Crazy", "Paper",
)  # fmt: skip
_SONG_WORDS_B = (
    "River", "Heart", "Lights", "Road", "Dreams", "Fire", "Rain", "Sky", "Love", "Home", "Stars", "City",
    "Ocean", "Shadows", "Morning", "Hearts", "Eyes", "Stone", "Waves", "Ghost", "Garden", "Letters",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Songs with their artist and length (seconds), and each song's cumulative play probability."""

    songs: tuple[str, ...]
    artists: tuple[str, ...]
    length: np.ndarray
    cumulative: np.ndarray

    def draw(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """Returns `size` song indices drawn by popularity."""
        return np.minimum(np.searchsorted(self.cumulative, rng.random(size), side="right"), len(self.songs) - 1)


def build_catalogue(rng: np.random.Generator, n_artists: int = 2000, n_songs: int = 20_000) -> Catalogue:
    """Returns a Zipf-like catalogue: popular artists own more songs, popular songs get most plays."""
    artist_names = [
        f"{rng.choice(_ARTIST_WORDS_A)} {rng.choice(_ARTIST_WORDS_B)}" if rng.random() < 0.6 else
        f"The {rng.choice(_ARTIST_WORDS_A)} {rng.choice(_ARTIST_WORDS_B)}"
        for _ in range(n_artists)
    ]  # fmt: skip
    artist_weight = 1.0 / np.arange(1, n_artists + 1) ** 0.9
    song_artist = rng.choice(n_artists, size=n_songs, p=artist_weight / artist_weight.sum())
    words_a, words_b = rng.choice(_SONG_WORDS_A, n_songs), rng.choice(_SONG_WORDS_B, n_songs)
    titles = tuple(
        f"{a} {b}" if i % 3 else f"The {a} {b}" for i, (a, b) in enumerate(zip(words_a, words_b, strict=True))
    )
    # Real track lengths: median near 4 minutes, a long right tail, nothing under half a minute.
    length = np.round(np.clip(rng.lognormal(np.log(235.0), 0.3, n_songs), 30.0, 1800.0), 5)
    popularity = 1.0 / (np.arange(n_songs) + 10.0) ** 1.0
    cumulative = np.cumsum(popularity / popularity.sum())
    cumulative[-1] = 1.0
    return Catalogue(titles, tuple(artist_names[a] for a in song_artist), length, cumulative)
