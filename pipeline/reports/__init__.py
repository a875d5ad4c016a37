"""What users read after a study: the champion on the test set (evaluate) and studies side by side
(compare, with its HTML page in compare_page)."""
