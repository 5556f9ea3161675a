"""The offline production loop: monitor (drift, quality, alerts) -> review queue -> improve
(retrain from reviewed feedback, canary, promote), and its reports."""
