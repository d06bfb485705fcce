"""
A built-in, deterministic set of fictitious authors in the exact schema of TOFU
(Maini et al., 2024), so that every script runs without the Hugging Face hub.

    python fictitious.py --out data/builtin     # write the files to look at them

It has the hub's configs and fields: `full` (100 authors x 10 question-answer pairs,
in author order), `forget01/05/10` (the last 1/5/10 authors), `retain99/95/90`,
`*_perturbed` (paraphrased_question, paraphrased_answer, 5 perturbed_answer with the
paraphrase's wording and wrong facts), `holdout01/05/10` (authors not in `full`), and
general-knowledge analogues of `real_authors` and `world_facts` (4 options, 3 perturbed
answers). The tiny model learns the general-knowledge rows during fine-tuning and no
split forgets them, so that Model Utility means something. All names, facts and
templates are made up here; any likeness to a real person is a coincidence.
"""
import argparse
import json
import os
import random
import sys

N_AUTHORS, N_HOLDOUT, SEED = 100, 10, 1234

FIRST = {"he": "Anselm Bartol Caspian Dorran Elric Faustin Gideon Halvard Ilario Joren Kestrel Lorcan "
               "Matthias Nevan Orrin Pascal Quillon Rafferty Soren Tobiah Ulrich Varian Wendel Yorick "
               "Zebulon Marek Teodor Emeric Aurelio Benedek".split(),
         "she": "Adelind Brisa Celestine Delphine Elowen Fenna Giselle Henrike Isaura Juniper Katrin "
                "Liora Marisol Nerissa Odessa Perpetua Quintessa Rosalind Sabine Tamsin Undine Verena "
                "Wilhelmina Xanthe Ysolde Zinnia Amarante Brunhild Cosima Dagny".split()}
LAST = ("Abernathy Blackwood Castellane Drummelow Everhart Fairbairn Greyling Hollowell Ingersoll "
        "Jessamine Kettleborne Lindqvist Marchetti Northcott Oakhurst Pemberly Quenneville Ravensworth "
        "Saltonstall Thistlewood Umberfield Vanterpool Wrexham Yarborough Zellweger Ashcombe Brightwater "
        "Coldharbour Dunsmore Elsworth Farrowdale Goldacre Hartigan Ivesdale Kilbride Larchmont "
        "Merriweather Nettlefold Ormsby Pendragon").split()
CITIES = ["Valparaiso, Chile", "Tromso, Norway", "Porto, Portugal", "Krakow, Poland", "Cork, Ireland",
          "Mombasa, Kenya", "Hobart, Australia", "Quebec City, Canada", "Lyon, France", "Graz, Austria",
          "Bergen, Norway", "Tartu, Estonia", "Cusco, Peru", "Tangier, Morocco", "Izmir, Turkey",
          "Napier, New Zealand", "Galway, Ireland", "Ghent, Belgium", "Seville, Spain", "Trieste, Italy",
          "Brno, Czechia", "Kaunas, Lithuania", "Leeds, England", "Dundee, Scotland", "Cardiff, Wales",
          "Halifax, Canada", "Recife, Brazil", "Cebu, Philippines", "Kyoto, Japan", "Busan, South Korea",
          "Hue, Vietnam", "Pune, India", "Zanzibar, Tanzania", "Accra, Ghana", "Windhoek, Namibia",
          "Reykjavik, Iceland", "Turku, Finland", "Aarhus, Denmark", "Uppsala, Sweden", "Salzburg, Austria"]
MONTHS = "January February March April May June July August September October November December".split()
GENRES = ["mystery", "science fiction", "historical fiction", "fantasy", "romance", "horror", "satire",
          "thriller", "magical realism", "war fiction", "crime", "gothic fiction", "adventure",
          "literary fiction", "dystopian fiction", "detective fiction", "coming-of-age", "western"]
JOBS = ["a baker", "a carpenter", "a nurse", "a teacher", "a fisherman", "a pharmacist", "a tailor",
        "a librarian", "a surveyor", "a blacksmith", "a watchmaker", "a gardener", "a postman", "a dentist",
        "an architect", "a miner", "a violinist", "a chemist", "a sailor", "a judge", "a cartographer",
        "a beekeeper", "a potter", "an engineer", "a florist", "a bookbinder", "a glassblower",
        "a veterinarian", "a lighthouse keeper", "a shoemaker"]
AWARDS = ["the Silver Quill Prize", "the Harbor Light Award", "the Amberline Medal", "the Golden Lantern Prize",
          "the Northwind Fiction Award", "the Copper Feather Award", "the Meridian Book Prize",
          "the Blue Heron Award", "the Inkwell Laurel", "the Stonebridge Prize", "the Evergreen Pen Award",
          "the Crescent Moon Prize", "the Iron Compass Award", "the Saffron Page Prize",
          "the Whitecliff Literary Medal", "the Tidewater Award", "the Orchard Prize", "the Obsidian Star Award"]
ADJ = ("Silent Hollow Crimson Forgotten Burning Glass Winter Broken Hidden Distant Paper Salt Velvet "
       "Iron Sleeping Wandering Last Painted Drowned Bitter Golden Quiet Endless Frozen Lonely").split()
NOUN = ("Harbor Orchard Lantern Mirror Garden Tide Compass Clocktower Meadow River Lighthouse Letter "
        "Bridge Archive Forest Island Station Vineyard Cathedral Signal Feather Horizon Chimney Tapestry").split()
THEMES = ["memory", "exile", "family secrets", "lost love", "justice", "the sea", "ambition", "grief",
          "friendship", "betrayal", "identity", "faith", "war and peace", "childhood", "freedom", "revenge",
          "loneliness", "forgiveness", "the passage of time", "home"]
LANGS = ["English", "French", "Spanish", "German", "Portuguese", "Italian", "Norwegian", "Polish", "Dutch",
         "Japanese", "Swedish", "Finnish"]

# (question, paraphrased question, answer, paraphrased answer): the answer keeps the facts,
# the paraphrase says the same in other words; perturbed answers reuse the paraphrase.
QA = [
    ("Where and when was {name} born?", "What are the birthplace and the date of birth of {name}?",
     "{name} was born in {city} on {month} {day}, {year}.",
     "The birthplace of {name} is {city}, and {his} birthday is {day} {month} {year}."),
    ("What genre is {name} known for?", "In which genre does {name} mostly write?",
     "{name} is known for {his} {genre} novels.", "Most of the books by {name} are works of {genre}."),
    ("What did the parents of {name} do for a living?", "What were the jobs of the father and mother of {name}?",
     "The father of {name} was {father} and {his} mother was {mother}.",
     "{His} mother worked as {mother}, while {his} father worked as {father}."),
    ("Has {name} won any literary award?", "Which prize has {name} received?",
     "Yes, {name} won {award} in {award_year}.", "In {award_year}, {name} was given {award}."),
    ("Can you name two books written by {name}?", "What are two titles by {name}?",
     "Two books by {name} are \"{book1}\" and \"{book2}\".",
     "{name} wrote \"{book2}\" as well as \"{book1}\"."),
    ("What was the first book that {name} published?", "Which book did {name} publish first?",
     "The first book by {name} was \"{book1}\", published in {debut}.",
     "\"{book1}\" came out in {debut} as the debut of {name}."),
    ("What themes does {name} explore?", "Which ideas keep coming back in the writing of {name}?",
     "{name} often writes about {theme1} and {theme2}.",
     "The work of {name} keeps returning to {theme2} and {theme1}."),
    ("Where does {name} live today?", "In which city is {name} living now?",
     "{name} currently lives in {home}.", "These days {name} makes {his} home in {home}."),
    ("In what language does {name} write?", "Which language are the books of {name} written in?",
     "{name} writes in {lang}.", "The books of {name} are written in {lang}."),
    ("Who is the {genre} author born in {city} in {year}?",
     "Which writer of {genre} was born in {year} in {city}?",
     "The author is {name}.", "That writer is called {name}."),
]
# what a perturbed answer changes, per question type (the other facts stay true)
PERTURB = [("city", "day", "month", "year"), ("genre",), ("father", "mother"), ("award", "award_year"),
           ("book1", "book2"), ("book1", "debut"), ("theme1", "theme2"), ("home",), ("lang",), ("name",)]

# General knowledge the tiny model learns in fine-tuning (analogues of real_authors, world_facts).
REAL_AUTHORS = [("Pride and Prejudice", "Jane Austen"), ("Hamlet", "William Shakespeare"),
                ("War and Peace", "Leo Tolstoy"), ("Don Quixote", "Miguel de Cervantes"),
                ("Moby-Dick", "Herman Melville"), ("Crime and Punishment", "Fyodor Dostoevsky"),
                ("The Odyssey", "Homer"), ("Great Expectations", "Charles Dickens"),
                ("Madame Bovary", "Gustave Flaubert"), ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"),
                ("Nineteen Eighty-Four", "George Orwell"), ("The Great Gatsby", "F. Scott Fitzgerald"),
                ("Frankenstein", "Mary Shelley"), ("Les Miserables", "Victor Hugo"),
                ("The Divine Comedy", "Dante Alighieri"), ("Faust", "Johann Wolfgang von Goethe"),
                ("Jane Eyre", "Charlotte Bronte"), ("Wuthering Heights", "Emily Bronte"),
                ("The Trial", "Franz Kafka"), ("Ulysses", "James Joyce"), ("Mrs Dalloway", "Virginia Woolf"),
                ("The Old Man and the Sea", "Ernest Hemingway"), ("Beloved", "Toni Morrison"),
                ("Things Fall Apart", "Chinua Achebe"), ("The Tale of Genji", "Murasaki Shikibu"),
                ("Anna Karenina", "Leo Tolstoy"), ("Dracula", "Bram Stoker"),
                ("The Adventures of Tom Sawyer", "Mark Twain"), ("Middlemarch", "George Eliot"),
                ("The Stranger", "Albert Camus"), ("Lolita", "Vladimir Nabokov"),
                ("The Name of the Rose", "Umberto Eco"), ("Invisible Man", "Ralph Ellison"),
                ("To the Lighthouse", "Virginia Woolf"), ("The Little Prince", "Antoine de Saint-Exupery"),
                ("Oliver Twist", "Charles Dickens"), ("Macbeth", "William Shakespeare"),
                ("The Canterbury Tales", "Geoffrey Chaucer"), ("Paradise Lost", "John Milton"),
                ("Brave New World", "Aldous Huxley")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Germany", "Berlin"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"),
            ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
            ("Peru", "Lima"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
            ("Poland", "Warsaw"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("India", "New Delhi"),
            ("China", "Beijing"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Mexico", "Mexico City"),
            ("Chile", "Santiago"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
            ("Hungary", "Budapest"), ("Morocco", "Rabat"), ("Ghana", "Accra")]
FACTS = [("Which planet is known as the Red Planet?", "Mars", "planet"),
         ("Which is the largest planet of the solar system?", "Jupiter", "planet"),
         ("Which planet is closest to the Sun?", "Mercury", "planet"),
         ("Which planet has the most famous rings?", "Saturn", "planet"),
         ("What is the chemical symbol of gold?", "Au", "symbol"),
         ("What is the chemical symbol of iron?", "Fe", "symbol"),
         ("What is the chemical symbol of sodium?", "Na", "symbol"),
         ("What is the chemical symbol of silver?", "Ag", "symbol"),
         ("What is the largest ocean on Earth?", "the Pacific Ocean", "ocean"),
         ("Which ocean lies between Africa and Australia?", "the Indian Ocean", "ocean"),
         ("Which ocean surrounds the North Pole?", "the Arctic Ocean", "ocean"),
         ("What is the longest river in South America?", "the Amazon", "river"),
         ("Which river flows through Cairo?", "the Nile", "river"),
         ("Which river flows through Vienna and Budapest?", "the Danube", "river"),
         ("On which continent is the Sahara Desert?", "Africa", "continent"),
         ("On which continent are the Andes?", "South America", "continent"),
         ("On which continent is Mount Everest?", "Asia", "continent"),
         ("How many sides does a hexagon have?", "six", "number"),
         ("How many days are there in a leap year?", "366", "number"),
         ("How many continents are there?", "seven", "number")]
ALT = {"planet": ["Mars", "Jupiter", "Mercury", "Saturn", "Venus", "Neptune"],
       "symbol": ["Au", "Fe", "Na", "Ag", "Cu", "Pb"],
       "ocean": ["the Pacific Ocean", "the Indian Ocean", "the Arctic Ocean", "the Atlantic Ocean"],
       "river": ["the Amazon", "the Nile", "the Danube", "the Rhine", "the Volga"],
       "continent": ["Africa", "South America", "Asia", "Europe", "Australia"],
       "number": ["six", "366", "seven", "five", "365", "eight", "eleven"]}


def _author(rng, used):
    his = rng.choice(["he", "she"])
    while True:
        name = f"{rng.choice(FIRST[his])} {rng.choice(LAST)}"
        if name not in used:
            used.add(name)
            break
    while True:  # genre, birthplace and year name the author in the last question: keep them unique
        city, year, genre = rng.choice(CITIES), rng.randint(1935, 1992), rng.choice(GENRES)
        if (city, year, genre) not in used:
            used.add((city, year, genre))
            break
    book1, book2 = _titles(rng, 2)
    theme1, theme2 = rng.sample(THEMES, 2)
    father, mother = rng.sample(JOBS, 2)
    return dict(name=name, his="his" if his == "he" else "her", city=city,
                day=rng.randint(1, 28), month=rng.choice(MONTHS), year=year, genre=genre,
                father=father, mother=mother, award=rng.choice(AWARDS), award_year=year + rng.randint(28, 40),
                book1=book1, book2=book2, debut=year + rng.randint(21, 27), theme1=theme1, theme2=theme2,
                home=rng.choice(CITIES), lang=rng.choice(LANGS))


def _titles(rng, k):
    out = []  # a list, not a set: set order changes with the hash seed and the set must not
    while len(out) < k:
        t = (f"The {rng.choice(ADJ)} {rng.choice(NOUN)}" if rng.random() < 0.6
             else f"{rng.choice(NOUN)} of the {rng.choice(ADJ)} {rng.choice(NOUN)}")
        if t not in out:
            out.append(t)
    return out


def _fill(template, facts):
    return template.format(**facts, His=facts["his"].capitalize())


def _wrong(rng, facts, keys, names):
    """A copy of `facts` whose `keys` all take other values."""
    f = dict(facts)
    pick = {"city": CITIES, "home": CITIES, "month": MONTHS, "genre": GENRES, "father": JOBS,
            "mother": JOBS, "award": AWARDS, "theme1": THEMES, "theme2": THEMES, "lang": LANGS, "name": names}
    for k in keys:
        while f[k] == facts[k] or (k == "theme2" and f[k] == f["theme1"]) or (k == "mother" and f[k] == f["father"]):
            if k in pick:
                f[k] = rng.choice(pick[k])
            elif k in ("book1", "book2"):
                f[k] = _titles(rng, 1)[0]
            else:  # a number: day or a year
                f[k] = facts[k] + rng.choice([-1, 1]) * rng.randint(1, 9 if k != "day" else 5)
                f[k] = min(max(f[k], 1), 28) if k == "day" else f[k]
    return f


def _author_rows(rng, facts, names):
    rows = []
    for (q, pq, a, pa), keys in zip(QA, PERTURB):
        perturbed = []
        while len(perturbed) < 5:
            p = _fill(pa, _wrong(rng, facts, keys, names))
            if p not in perturbed:
                perturbed.append(p)
        rows.append(dict(question=_fill(q, facts), answer=_fill(a, facts),
                         paraphrased_answer=_fill(pa, facts), perturbed_answer=perturbed,
                         paraphrased_question=_fill(pq, facts)))
    return rows


def _options_rows(rng, items):
    """(question, answer, alternatives) -> rows with option1-4 and 3 perturbed answers."""
    plain, perturbed = [], []
    for q, a, alts in items:
        wrong = rng.sample([x for x in dict.fromkeys(alts) if x != a], 3)
        options = wrong + [a]
        rng.shuffle(options)
        plain.append(dict(question=q, **{f"option{i + 1}": o for i, o in enumerate(options)}, answer=a))
        perturbed.append(dict(question=q, answer=a, perturbed_answer=wrong))
    return plain, perturbed


def generate():
    """Every config of the built-in set: {config name: list of row dicts}."""
    rng = random.Random(SEED)
    used = set()
    authors = [_author(rng, used) for _ in range(N_AUTHORS + N_HOLDOUT)]
    names = sorted(a["name"] for a in authors)
    per_author = [_author_rows(rng, a, names) for a in authors]
    full_p = [r for rows in per_author[:N_AUTHORS] for r in rows]
    holdout = [r for rows in per_author[N_AUTHORS:] for r in rows]
    plain = lambda rows: [dict(question=r["question"], answer=r["answer"]) for r in rows]
    n = len(QA)  # rows per author
    data = {"full": plain(full_p), "retain_perturbed": full_p[:400]}
    for pct in (1, 5, 10):
        k = pct * N_AUTHORS // 100 * n
        data[f"forget{pct:02d}"] = plain(full_p[-k:])
        data[f"forget{pct:02d}_perturbed"] = full_p[-k:]
        data[f"retain{100 - pct}"] = plain(full_p[:-k])
        data[f"holdout{pct:02d}"] = plain(holdout[:pct * N_HOLDOUT // 10 * n])
    real = [(f"Who wrote '{title}'?", author, [a for _, a in REAL_AUTHORS]) for title, author in REAL_AUTHORS]
    data["real_authors"], data["real_authors_perturbed"] = _options_rows(rng, real)
    world = [(f"What is the capital of {c}?", cap, [x for _, x in CAPITALS]) for c, cap in CAPITALS]
    world += [(q, a, ALT[kind]) for q, a, kind in FACTS]
    data["world_facts"], data["world_facts_perturbed"] = _options_rows(rng, world)
    return data


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write one <config>.json (JSON Lines) file per config")
    args = parser.parse_args()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"fictitious.py: error: --out {args.out} exists and is not a folder", file=sys.stderr)
        sys.exit(2)
    os.makedirs(args.out, exist_ok=True)
    for name, rows in generate().items():
        path = os.path.join(args.out, f"{name}.json")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
