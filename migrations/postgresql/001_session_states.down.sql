DROP TABLE session_states;
