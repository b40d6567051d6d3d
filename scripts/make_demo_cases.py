"""Writes the demo's packaged cases: 240 invented RareArena RDC records over 10 rare diseases.

Each case pairs shared, uninformative findings (fatigue, a raised CRP, ...) with two findings
that only its disease has: a sign in the report, and in the test results its hallmark
investigation, whose keyword every case of the disease holds. So a tiny model can learn the
disease from the text; nothing in the text names the disease. No patient data: every
case is drawn from the phrase tables below with a fixed seed, so the output never changes.

    python scripts/make_demo_cases.py            # rewrites jaxzero/diagnosis/demo_data/cases.jsonl
    python scripts/make_demo_cases.py --out F    # writes F instead
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
from pathlib import Path

SEED = 17
CASES_PER_DISEASE = 24
OUT = Path(__file__).resolve().parents[1] / "jaxzero" / "diagnosis" / "demo_data" / "cases.jsonl"

# Orphanet name and number; how a case report may word the diagnosis; signs on examination
# that only this disease has; and its hallmark investigation, worded three ways that all hold
# one keyword (alpha-galactosidase, ceruloplasmin, ...), so every case of a disease shares it.
DISEASES = (
    ("Fabry disease", 324,
     ("Fabry disease", "Classic Fabry disease", "Fabry disease with cardiac involvement"),
     ("clusters of dark red angiokeratomas around the umbilicus",
      "burning pain in the hands and feet, worse with heat",
      "whorl-like corneal opacities on slit-lamp examination"),
     ("Leukocyte alpha-galactosidase A activity was markedly reduced",
      "Plasma alpha-galactosidase A activity was very low",
      "Testing found a pathogenic variant in the alpha-galactosidase A gene")),
    ("Wilson disease", 905,
     ("Wilson disease", "Hepatic Wilson disease", "Neurological Wilson disease"),
     ("golden-brown Kayser-Fleischer rings at the corneal margins",
      "a wing-beating tremor of the arms and drooling",
      "sunflower cataracts and a flapping tremor"),
     ("Serum ceruloplasmin was very low",
      "Ceruloplasmin was 6 mg/dL and urinary copper was high",
      "A low ceruloplasmin came with raised copper in a liver biopsy")),
    ("Takayasu arteritis", 3287,
     ("Takayasu arteritis", "Takayasu arteritis, type V"),
     ("absent radial pulses on both sides",
      "a systolic pressure 40 mmHg lower in the left arm than the right",
      "cramping of the arms when combing the hair"),
     ("Angiography showed long smooth stenoses of both subclavian arteries",
      "MR angiography showed a narrowed left subclavian artery",
      "CT angiography showed occlusion of the right subclavian artery")),
    ("Erdheim-Chester disease", 35687,
     ("Erdheim-Chester disease", "Erdheim-Chester disease with BRAF V600E mutation"),
     ("yellow plaques of xanthelasma on both eyelids",
      "bilateral exophthalmos from retro-orbital masses",
      "a hairy kidney appearance on abdominal CT"),
     ("Biopsy showed foamy CD68-positive, CD1a-negative histiocytes",
      "Perirenal tissue held lipid-laden histiocytes with a BRAF mutation",
      "A tibial biopsy showed infiltrating foamy histiocytes")),
    ("Gaucher disease", 355,
     ("Gaucher disease", "Gaucher disease type 1", "Type 1 Gaucher disease"),
     ("a spleen reaching the iliac crest",
      "bone crises in the thighs since adolescence",
      "an Erlenmeyer flask deformity of the distal femora"),
     ("Leukocyte glucocerebrosidase activity was markedly reduced",
      "Glucocerebrosidase activity was a tenth of normal",
      "Testing found two variants in the glucocerebrosidase gene")),
    ("Acromegaly", 963,
     ("Acromegaly", "Acromegaly due to a pituitary macroadenoma"),
     ("coarse facial features, a protruding jaw and spaced teeth",
      "rings and shoes that no longer fit over several years",
      "a deep voice, large hands and a large tongue"),
     ("Serum IGF-1 was three times the upper limit for age",
      "IGF-1 was raised and growth hormone did not suppress after glucose",
      "A raised IGF-1 came with a 14 mm pituitary macroadenoma on MRI")),
    ("Myasthenia gravis", 589,
     ("Myasthenia gravis", "Generalized myasthenia gravis", "Ocular myasthenia gravis"),
     ("drooping eyelids that worsened through the day",
      "double vision in the evenings that cleared after rest",
      "jaw fatigue while chewing and a nasal voice late in the day"),
     ("Acetylcholine receptor antibodies were strongly positive",
      "Serum acetylcholine receptor antibodies were raised",
      "Acetylcholine receptor antibodies were positive and nerve stimulation showed a "
      "decrement")),
    ("Granulomatosis with polyangiitis", 900,
     ("Granulomatosis with polyangiitis",
      "Granulomatosis with polyangiitis (PR3-ANCA positive)"),
     ("bloody nasal crusts and a saddle-nose deformity",
      "chronic sinusitis with nosebleeds and coughing up blood",
      "cavitating lung nodules on a chest CT"),
     ("Serum c-ANCA was positive with PR3 antibodies",
      "PR3-ANCA was strongly positive",
      "A positive c-ANCA came with red cell casts in the urine")),
    ("Marfan syndrome", 558,
     ("Marfan syndrome", "Neonatal Marfan syndrome", "Marfan syndrome with aortic dilatation"),
     ("long thin fingers and an arm span greater than the height",
      "lenses displaced upwards in both eyes",
      "a sunken breastbone and very flexible joints"),
     ("Testing found a pathogenic variant in the fibrillin-1 gene",
      "Fibrillin-1 sequencing found a frameshift variant",
      "A fibrillin-1 variant came with a widened aortic root on echocardiography")),
    ("Paroxysmal nocturnal hemoglobinuria", 447,
     ("Paroxysmal nocturnal hemoglobinuria", "Classic paroxysmal nocturnal hemoglobinuria"),
     ("dark red urine on waking that cleared by the afternoon",
      "a clot in the hepatic veins with a swollen abdomen",
      "pallor with painful swallowing during bouts of dark urine"),
     ("Flow cytometry showed red cells lacking CD59",
      "CD59-deficient granulocytes were found on flow cytometry",
      "LDH was high and flow cytometry showed a CD59-negative clone")),
)

# Findings any of the diseases may come with: they say nothing about which one it is.
SYMPTOMS = ("fatigue", "weight loss of 4 kg", "a low-grade fever", "night sweats",
            "headaches", "aching joints", "a poor appetite", "mild nausea", "low back pain",
            "breathlessness on stairs", "poor sleep", "muscle aches")
DURATIONS = ("two weeks", "a month", "three months", "six months", "a year", "two years")
EXAM_OPENINGS = ("Examination showed", "On examination there was", "The doctor noted")
LABS = ("Haemoglobin was 11.2 g/dL", "CRP was 18 mg/L", "ESR was 42 mm/h",
        "Electrolytes were normal", "Thyroid function was normal", "ALT was mildly raised",
        "Fasting glucose was normal", "Platelets were normal", "Creatinine was normal",
        "Ferritin was mildly raised")


def make_case(rng: random.Random, index: int, disease) -> dict:
    name, orpha_id, wordings, signs, tests = disease
    age = rng.randint(16, 78)
    gender = rng.choice(("Male", "Female"))
    person = "man" if gender == "Male" else "woman"
    first, second = rng.sample(SYMPTOMS, 2)
    lab = rng.choice(LABS)
    report = (f"A {age}-year-old {person} had {first} and {second} for {rng.choice(DURATIONS)}. "
              f"{rng.choice(EXAM_OPENINGS)} {rng.choice(signs)}.")
    results = f"{lab}. {rng.choice(tests)}."
    day = datetime.date(2005, 1, 1) + datetime.timedelta(days=rng.randrange(20 * 365))
    return {"_id": f"demo-{index:03d}", "case_report": report, "test_results": results,
            "diagnosis": rng.choice(wordings), "Orpha_name": name, "Orpha_id": orpha_id,
            "age": str(age), "gender": gender, "pub_date": day.isoformat()}


def make_cases(seed: int = SEED) -> list[dict]:
    """Rounds of one case per disease in a shuffled order, so any leading 70 % of the file
    (the training split) and the rest both hold every disease."""
    rng = random.Random(seed)
    cases, reports, results = [], set(), set()
    for _ in range(CASES_PER_DISEASE):
        for disease in rng.sample(DISEASES, len(DISEASES)):
            while True:  # a repeat of an earlier case's report or results is drawn again
                case = make_case(rng, len(cases) + 1, disease)
                if case["case_report"] not in reports and case["test_results"] not in results:
                    break
            reports.add(case["case_report"])
            results.add(case["test_results"])
            cases.append(case)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output file (default {OUT})")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    lines = [json.dumps(c, ensure_ascii=False) for c in make_cases(args.seed)]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} cases to {args.out}")


if __name__ == "__main__":
    main()
