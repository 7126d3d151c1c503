DROP TABLE IF EXISTS session_states;
