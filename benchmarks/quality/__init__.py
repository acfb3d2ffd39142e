"""Quality suites: accuracy and perplexity of each method under declared protocols."""
