"""Captions for the procedural clips, in the style of Bora's evaluation prompts, with attributes in words.

Ten templates per domain; the last one (`HELD_OUT`) is never used for training, only by `bora eval`, so
the model is measured on phrasings it has not seen. Many phrasings per domain teach a small model the domain
words rather than the sentence shapes of a few templates.
"""

from __future__ import annotations

import numpy as np

HELD_OUT = 9  # template index kept for evaluation (the last of each domain)
TRAIN_TEMPLATES = tuple(range(HELD_OUT))

TEMPLATES = {
    "cell": (
        "The video shows a fluorescence microscopic view of {count} {colour} cells drifting {speed_adv} "
        "across a dark field{dividing}.",
        "A microscopy video of {count} cells glowing {colour} on a black background, moving {speed_adv}"
        "{dividing}.",
        "{count} {colour} stained cells with dark nuclei float {speed_adv} under the microscope{dividing}.",
        "Time-lapse cell microscopy: {colour} fluorescent cells, {count} of them, migrate {speed_adv} through "
        "the medium{dividing}.",
        "The field of view contains {count} round {colour} cells with visible nuclei that drift "
        "{speed_adv}{dividing}.",
        "Live-cell imaging shows {count} {colour} cells moving {speed_adv} on a dark dish{dividing}.",
        "A fluorescent microscope recording: {colour} labelled cells drift {speed_adv}, {count} in view"
        "{dividing}.",
        "Cultured cells stained {colour}, {count} of them, wander {speed_adv} across the black slide"
        "{dividing}.",
        "In this microscopy time-lapse {count} bright {colour} cells with nuclei travel {speed_adv}{dividing}.",
        "Under a fluorescence microscope, {count} cells labelled in {colour} move {speed_adv} over a dark "
        "background{dividing}.",
    ),
    "ultrasound": (
        "An echocardiogram in a {colour} ultrasound sector shows a heart chamber beating at a {speed} rate.",
        "The ultrasound video displays a speckled {colour} fan-shaped image with a {speed} beating cardiac "
        "chamber.",
        "A {colour} echocardiography clip: the ventricle contracts and relaxes with a {speed} heartbeat inside "
        "the sector scan.",
        "Cardiac ultrasound with grainy {colour} speckle; the chamber walls pulse at a {speed} heart rate.",
        "A sector-shaped {colour} sonography view of the heart, its dark chamber expanding and contracting "
        "{speed_adv}.",
        "Echocardiography in {colour}: a grainy fan with the heart's chamber pumping {speed_adv}.",
        "A transthoracic ultrasound of the heart, {colour} speckle, the chamber beating at a {speed} rate.",
        "The sonogram shows a {colour} sector with a cardiac chamber that contracts {speed_adv}.",
        "Heart ultrasound footage: the {colour} speckled sector and a ventricle pulsing {speed_adv}.",
        "An ultrasound scan in {colour} tones, showing a dark cardiac chamber that beats {speed_adv} within "
        "the speckled fan.",
    ),
    "mri": (
        "A real-time MRI of the head and neck in a mid-sagittal slice shows the tongue moving {speed_adv} "
        "during speech.",
        "The video is a black and white MRI of a human head from the side; the tongue rises and falls at a "
        "{speed} pace.",
        "Mid-sagittal real-time MRI of the vocal tract: the skull, the dark airway and the tongue moving "
        "{speed_adv}.",
        "A grayscale dynamic MRI sequence of a speaker's head, lateral view, with {speed} tongue motion.",
        "Real-time magnetic resonance imaging of the upper airway, the tongue articulating {speed_adv}.",
        "An MRI movie of a person talking, sagittal head slice, the tongue moving at a {speed} pace.",
        "Dynamic MRI of speech: a side view of the skull and airway as the tongue moves {speed_adv}.",
        "A grey real-time MRI scan of the head in profile while the tongue shapes words {speed_adv}.",
        "Speech MRI, mid-sagittal plane: head, airway and tongue, the tongue rising and falling {speed_adv}.",
        "A sagittal MRI video of the head where the tongue moves up and down {speed_adv} as the person "
        "speaks.",
    ),
    "endoscopy": (
        "An endoscopic view of the {colour} mucosa of the gastrointestinal tract as the scope moves "
        "{speed_adv} forward through the lumen.",
        "The endoscopy video shows a {colour} tunnel of intestinal wall with folds passing by {speed_adv}.",
        "A colonoscopy clip: {colour} glistening mucosa around a dark lumen, the camera advancing {speed_adv}.",
        "Endoscope footage inside the bowel, {colour} tissue with circular folds and bright reflections, "
        "moving {speed_adv}.",
        "A {speed} forward endoscopic journey through a {colour} lumen with moist folds and highlights.",
        "Gastrointestinal endoscopy: the camera travels {speed_adv} along {colour} folds of the bowel wall.",
        "A {colour} intestinal lumen seen through an endoscope that moves {speed_adv} ahead.",
        "Endoscopic footage of the colon, {colour} mucosal folds and shiny highlights passing {speed_adv}.",
        "The scope advances {speed_adv} through the gut, {colour} walls and folds around the dark opening.",
        "Inside the digestive tract, the endoscope glides {speed_adv} past {colour} folds toward the dark "
        "lumen.",
    ),
}

_SPEED_ADVERB = {"slow": "slowly", "fast": "quickly"}
_COUNT = {"few": "a few", "many": "many"}


def caption(domain: str, attrs: dict, template: int) -> str:
    """The caption of a clip rendered with `attrs`, in template `template` of its domain."""
    words = {
        "colour": attrs.get("colour", ""),
        "speed": attrs["speed"],
        "speed_adv": _SPEED_ADVERB[attrs["speed"]],
        "count": _COUNT.get(attrs.get("count", ""), ""),
        "dividing": ", and some of them divide" if attrs.get("dividing") else "",
    }
    text = TEMPLATES[domain][template].format(**words)
    return text[0].upper() + text[1:]


def pick_template(rng: np.random.Generator, held_out: bool) -> int:
    return HELD_OUT if held_out else int(TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))])


def corpus() -> tuple[str, ...]:
    """Every template with every attribute word, for the demo tokenizer's vocabulary."""
    from demo.procedural import CELL_COLOURS, ENDO_COLOURS, ULTRASOUND_TINTS

    lines = []
    for domain, templates in TEMPLATES.items():
        colours = {"cell": CELL_COLOURS, "ultrasound": ULTRASOUND_TINTS, "endoscopy": ENDO_COLOURS}.get(
            domain, {"": None})
        for template in range(len(templates)):
            for colour in colours:
                for speed in ("slow", "fast"):
                    for count in ("few", "many"):
                        attrs = {"colour": colour, "speed": speed, "count": count, "dividing": True}
                        lines.append(caption(domain, attrs, template).lower())
    return tuple(dict.fromkeys(lines))
