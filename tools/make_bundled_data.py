#!/usr/bin/env python
"""Write the bundled instruction set (Alpaca format) of the demo and the tests.

Every answer is either computed here (arithmetic, conversions, word and list operations)
or taken from the short fact tables and handwritten answers below, so each is correct.
Deterministic: the same file on every run. Output: symnoise_megatron/data/bundled/instructions.json
"""

import json
import os
import random

HANDWRITTEN = [
    ("Explain why the sky looks blue during the day.", "", "Sunlight contains all visible colours. When it passes through the atmosphere, air molecules scatter short wavelengths much more strongly than long ones (Rayleigh scattering). Blue light is scattered in every direction across the sky, so wherever we look away from the Sun we see that scattered blue light."),
    ("What is photosynthesis?", "", "Photosynthesis is the process by which plants, algae and some bacteria use the energy of light to turn carbon dioxide and water into glucose and oxygen. It takes place mainly in the chloroplasts of leaf cells, and it is the source of almost all the oxygen in the air."),
    ("Give three tips for staying focused while studying.", "", "1. Put your phone in another room so notifications cannot interrupt you.\n2. Work in short blocks, such as 25 minutes, followed by a five-minute break.\n3. Decide before you start exactly which task you will finish in the session."),
    ("Describe what a prime number is.", "", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself. For example, 2, 3, 5, 7 and 11 are prime, while 9 is not, because it can be divided by 3."),
    ("Summarize the water cycle in two sentences.", "", "Water evaporates from oceans, lakes and plants, rises as vapour and condenses into clouds. It then falls back as rain or snow and flows through rivers and the ground back to the sea, where the cycle starts again."),
    ("What is the difference between weather and climate?", "", "Weather is the state of the atmosphere at a given place and time, such as today's rain or wind. Climate is the average pattern of weather in a region over many years, usually thirty or more."),
    ("Suggest a name for a small bakery that sells bread and cakes.", "", "How about \"The Rising Loaf\"? It is short, easy to remember, and hints at both fresh bread and a warm, welcoming shop."),
    ("Write a haiku about autumn leaves.", "", "Red leaves drift and fall,\nthe cold wind carries them home,\nbare trees watch them go."),
    ("Explain what a noun is and give two examples.", "", "A noun is a word that names a person, place, thing or idea. Examples are \"river\" and \"happiness\"."),
    ("Why do we have seasons on Earth?", "", "Earth's axis is tilted by about 23.5 degrees relative to its orbit. As Earth travels around the Sun, each hemisphere is tilted towards the Sun for part of the year, receiving more direct sunlight and longer days (summer), and tilted away for another part (winter)."),
    ("What does a thermometer measure?", "", "A thermometer measures temperature, that is, how hot or cold something is."),
    ("Give a short definition of gravity.", "", "Gravity is the force by which masses attract one another. On Earth it pulls objects towards the ground and gives them weight."),
    ("List three renewable sources of energy.", "", "Solar power, wind power and hydroelectric power."),
    ("Explain the purpose of a table of contents in a book.", "", "A table of contents lists the chapters or sections of a book with their page numbers, so a reader can see how the book is organised and find a part quickly."),
    ("Rewrite the sentence in the passive voice.", "The cat chased the mouse.", "The mouse was chased by the cat."),
    ("Rewrite the sentence in the passive voice.", "The chef prepared the meal.", "The meal was prepared by the chef."),
    ("Rewrite the sentence in the past tense.", "She walks to school every day.", "She walked to school every day."),
    ("Rewrite the sentence in the past tense.", "They play football in the park.", "They played football in the park."),
    ("Correct the spelling mistake in the sentence.", "I recieved your letter yesterday.", "I received your letter yesterday."),
    ("Correct the spelling mistake in the sentence.", "The weather is beautifull today.", "The weather is beautiful today."),
    ("What is the boiling point of water at sea level in degrees Celsius?", "", "Water boils at 100 degrees Celsius at sea level."),
    ("How many continents are there, and what are they?", "", "By the most common convention there are seven continents: Africa, Antarctica, Asia, Australia (Oceania), Europe, North America and South America."),
    ("What is the main function of the heart?", "", "The heart pumps blood through the body. The blood carries oxygen and nutrients to the tissues and takes carbon dioxide and other waste away from them."),
    ("Give two reasons why exercise is good for health.", "", "Regular exercise strengthens the heart and lungs, and it helps control body weight by using energy."),
    ("Explain what an algorithm is in simple terms.", "", "An algorithm is a precise list of steps for solving a problem or doing a task, like a recipe that a person or a computer can follow from start to finish."),
    ("What is the opposite of the word 'ancient'?", "", "The opposite of 'ancient' is 'modern'."),
    ("Turn the statement into a question.", "The train leaves at six.", "Does the train leave at six?"),
    ("Turn the statement into a question.", "You have finished your homework.", "Have you finished your homework?"),
    ("Write a polite sentence asking a colleague to send a report.", "", "Could you please send me the report when you have a moment? Thank you."),
    ("Explain the difference between a virus and a bacterium.", "", "Bacteria are single-celled living organisms that can grow and divide on their own, and many are harmless or useful. Viruses are much smaller particles that cannot reproduce by themselves; they must enter a living cell and use it to make copies of themselves."),
]

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Australia": "Canberra", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Argentina": "Buenos Aires", "India": "New Delhi", "China": "Beijing", "Norway": "Oslo",
    "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Portugal": "Lisbon",
    "Greece": "Athens", "Ireland": "Dublin", "Peru": "Lima", "Thailand": "Bangkok",
    "Austria": "Vienna", "Hungary": "Budapest", "Denmark": "Copenhagen", "Belgium": "Brussels",
}
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "light": "dark",
    "open": "closed", "full": "empty", "strong": "weak", "rich": "poor", "young": "old",
    "high": "low", "wet": "dry", "loud": "quiet", "hard": "soft", "near": "far",
}
PLURALS = {
    "child": "children", "mouse": "mice", "box": "boxes", "city": "cities", "knife": "knives",
    "tooth": "teeth", "woman": "women", "bus": "buses", "leaf": "leaves", "baby": "babies",
    "foot": "feet", "goose": "geese", "church": "churches", "hero": "heroes", "sheep": "sheep",
}
ANIMALS = {
    "dog": "mammal", "eagle": "bird", "salmon": "fish", "whale": "mammal", "penguin": "bird",
    "shark": "fish", "bat": "mammal", "owl": "bird", "tuna": "fish", "dolphin": "mammal",
    "sparrow": "bird", "horse": "mammal", "trout": "fish", "parrot": "bird",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTH_DAYS = {"January": 31, "March": 31, "April": 30, "May": 31, "June": 30, "July": 31,
              "August": 31, "September": 30, "October": 31, "November": 30, "December": 31}
WORDS = ["garden", "planet", "window", "rocket", "silver", "forest", "bridge", "candle", "pencil",
         "market", "orange", "winter", "castle", "dragon", "spring", "button", "jacket", "violin"]
SENTENCES = ["the quick brown fox jumps over the lazy dog", "rain is expected in the afternoon",
             "she reads a new book every week", "the museum opens at nine in the morning",
             "our team won the final match", "fresh bread smells wonderful",
             "the river flows towards the sea", "he planted tomatoes in the garden"]


def is_prime(n):
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def generated(rng):
    out = []
    for _ in range(40):
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        op = rng.choice(["plus", "minus", "times"])
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        out.append((f"What is {a} {op} {b}?", "", f"{a} {op} {b} is {value}."))
    for _ in range(12):
        b, q = rng.randint(2, 12), rng.randint(2, 20)
        out.append((f"Divide {b * q} by {b}.", "", f"{b * q} divided by {b} is {q}."))
    for country, capital in CAPITALS.items():
        out.append((f"What is the capital of {country}?", "", f"The capital of {country} is {capital}."))
    for word, opposite in ANTONYMS.items():
        out.append(("Give the opposite of the word.", word, f"The opposite of \"{word}\" is \"{opposite}\"."))
    for word, plural in PLURALS.items():
        out.append((f"What is the plural of \"{word}\"?", "", f"The plural of \"{word}\" is \"{plural}\"."))
    for animal, group in ANIMALS.items():
        out.append((f"Is a {animal} a mammal, a bird or a fish?", "", f"A {animal} is a {group}."))
    for index, day in enumerate(DAYS):
        out.append((f"What day comes after {day}?", "", f"{DAYS[(index + 1) % 7]} comes after {day}."))
    for month, days in MONTH_DAYS.items():
        out.append((f"How many days are there in {month}?", "", f"{month} has {days} days."))
    for word in WORDS:
        out.append(("Reverse the letters of the word.", word, word[::-1]))
        vowels = sum(ch in "aeiou" for ch in word)
        out.append(("Count the vowels in the word.", word, f"The word \"{word}\" has {vowels} vowels."))
    for sentence in SENTENCES:
        out.append(("Convert the sentence to upper case.", sentence, sentence.upper()))
        out.append(("How many words are in the sentence?", sentence, f"The sentence has {len(sentence.split())} words."))
        out.append(("Capitalize the first letter of the sentence and end it with a full stop.", sentence, sentence[0].upper() + sentence[1:] + "."))
    for _ in range(14):
        items = rng.sample(WORDS, 4)
        out.append(("Sort the words in alphabetical order.", ", ".join(items), ", ".join(sorted(items))))
    for _ in range(14):
        numbers = rng.sample(range(1, 100), 5)
        task = rng.choice(["sum", "largest", "smallest", "sorted"])
        text = ", ".join(map(str, numbers))
        if task == "sum":
            out.append(("Add up the numbers.", text, f"The sum is {sum(numbers)}."))
        elif task == "largest":
            out.append(("Find the largest number in the list.", text, f"The largest number is {max(numbers)}."))
        elif task == "smallest":
            out.append(("Find the smallest number in the list.", text, f"The smallest number is {min(numbers)}."))
        else:
            out.append(("Sort the numbers from smallest to largest.", text, ", ".join(map(str, sorted(numbers)))))
    for celsius in rng.sample(range(-20, 41), 10):
        fahrenheit = celsius * 9 / 5 + 32
        out.append((f"Convert {celsius} degrees Celsius to Fahrenheit.", "",
                    f"{celsius} degrees Celsius is {fahrenheit:g} degrees Fahrenheit, since F = C x 9/5 + 32."))
    for km in rng.sample(range(1, 50), 8):
        out.append((f"How many metres are in {km} kilometres?", "", f"There are {km * 1000} metres in {km} kilometres."))
    for hours in rng.sample(range(1, 24), 8):
        out.append((f"How many minutes are in {hours} hours?", "", f"There are {hours * 60} minutes in {hours} hours."))
    for n in rng.sample(range(2, 100), 16):
        answer = "is a prime number" if is_prime(n) else "is not a prime number"
        parity = "even" if n % 2 == 0 else "odd"
        out.append((f"Is {n} a prime number?", "", f"{n} {answer}."))
        out.append((f"Is {n} even or odd?", "", f"{n} is {parity}."))
    return out


def main():
    rng = random.Random(20231201)
    pairs = HANDWRITTEN + generated(rng)
    rng.shuffle(pairs)
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in pairs]
    path = os.path.join(os.path.dirname(__file__), "..", "symnoise_megatron", "data", "bundled", "instructions.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=1, ensure_ascii=False)
        handle.write("\n")
    print(f"wrote {len(rows)} rows to {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
